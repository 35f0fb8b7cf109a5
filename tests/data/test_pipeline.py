"""The batch pipeline: shapes, packing semantics by hand, document boundaries, exact resume, mixing."""

import json

import numpy as np
import pytest

from tests.data.data_testing import CharTokenizer, write_jsonl
from jaxllm.config import DataConfig, JaxllmError, SourceConfig, load_config
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer

FIELDS = {
    "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.float32,
}  # fmt: skip


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return load_tokenizer("builtin:kjv-sp4k")


def test_batch_shapes_and_dtypes(kjv_tokenizer):
    pipeline = make_pipeline(DataConfig(seq_len=128), kjv_tokenizer, batch_size=4)
    batch = next(pipeline)
    pipeline.close()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((4, 128), np.dtype(t)) for k, t in FIELDS.items()}


def test_packing_by_hand(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", ["abc", "de", "fghijkl"])
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "tiny.jsonl"))], seq_len=6, shuffle_window=0, prefetch=0)
    first, second = list(make_pipeline(cfg, CharTokenizer(), batch_size=2, num_epochs=1))
    a, b, c, d, e, f, g, h, i, j, k, l = range(97, 109)  # noqa: E741 (the letters' ids)
    # Documents with BOS=1 and EOS=2: [1 a b c 2] [1 d e 2] [1 f g h i j k l 2]; inputs drop the last
    # token, targets the first; rows of 6 are filled in order and long documents continue on the next row.
    np.testing.assert_array_equal(first["inputs"], [[1, a, b, c, 1, d], [e, 1, f, g, h, i]])
    np.testing.assert_array_equal(first["targets"], [[a, b, c, 2, d, e], [2, f, g, h, i, j]])
    np.testing.assert_array_equal(first["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(first["positions"], [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(first["loss_mask"], np.ones((2, 6)))
    # The end of the data: the last row and the batch are padded with segment 0, masked out of the loss.
    np.testing.assert_array_equal(second["inputs"], [[j, k, l, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(second["targets"], [[k, l, 2, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(second["segment_ids"], [[1, 1, 1, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(second["positions"], [[0, 1, 2, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(second["loss_mask"], [[1, 1, 1, 0, 0, 0], [0] * 6])


def test_without_bos_and_eos(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", ["abc", "x", "de"])  # "x" alone has no next token: dropped
    cfg = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "tiny.jsonl"))], seq_len=4, shuffle_window=0, prefetch=0,
        add_bos=False, add_eos=False,
    )  # fmt: skip
    (batch,) = list(make_pipeline(cfg, CharTokenizer(), batch_size=1, num_epochs=1))
    np.testing.assert_array_equal(batch["inputs"], [[97, 98, 100, 0]])
    np.testing.assert_array_equal(batch["targets"], [[98, 99, 101, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 2, 0]])


def test_targets_never_cross_documents(kjv_tokenizer):
    pipeline = make_pipeline(DataConfig(seq_len=512, shuffle_window=8, prefetch=0), kjv_tokenizer, batch_size=8)
    for _ in range(3):
        batch = next(pipeline)
        inputs, targets, segments = batch["inputs"], batch["targets"], batch["segment_ids"]
        same = segments[:, 1:] == segments[:, :-1]
        np.testing.assert_array_equal(np.where(same, targets[:, :-1], 0), np.where(same, inputs[:, 1:], 0))
        ends = ~same  # the last token of a segment that ends within its row predicts EOS
        assert (targets[:, :-1][ends] == kjv_tokenizer.eos_id).all()
        assert (inputs[:, 1:][ends] == kjv_tokenizer.bos_id).all()  # and the next document starts with BOS
        assert ends.sum() > 0


def _mixed_config(tmp_path, prefetch):
    write_jsonl(tmp_path / "extra.jsonl", [f"extra document number {i}, " * (i % 5 + 1) for i in range(11)])
    return DataConfig(
        sources=[SourceConfig(path="builtin:kjv-valid"), SourceConfig(path=str(tmp_path / "extra.jsonl"), weight=0.5)],
        seq_len=64, shuffle_window=16, seed=7, prefetch=prefetch,
    )  # fmt: skip


@pytest.mark.parametrize("taken, prefetch", [(0, 2), (3, 2), (40, 2), (5, 0)])
def test_resume_is_exact(tmp_path, kjv_tokenizer, taken, prefetch):
    cfg = _mixed_config(tmp_path, prefetch)
    pipeline = make_pipeline(cfg, kjv_tokenizer, batch_size=3, process_index=1, process_count=2)
    for _ in range(taken):
        next(pipeline)
    state = json.loads(json.dumps(pipeline.get_state()))  # as a checkpoint stores it
    expected = [next(pipeline) for _ in range(6)]
    pipeline.close()
    fresh = make_pipeline(cfg, kjv_tokenizer, batch_size=3, process_index=1, process_count=2)
    fresh.set_state(state)
    for want, got in zip(expected, [next(fresh) for _ in range(6)]):
        for key in FIELDS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    fresh.close()


def test_state_from_another_layout_is_refused(tmp_path, kjv_tokenizer):
    cfg = _mixed_config(tmp_path, prefetch=0)
    state = make_pipeline(cfg, kjv_tokenizer, batch_size=2).get_state()
    other = make_pipeline(DataConfig(prefetch=0), kjv_tokenizer, batch_size=2)
    with pytest.raises(JaxllmError, match="saved with sources=.*resume with the same data.sources"):
        other.set_state(state)


def test_mixture_weights_are_respected(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["a" * 9] * 50)
    write_jsonl(tmp_path / "b.jsonl", ["b" * 9] * 50)
    sources = [SourceConfig(path=str(tmp_path / "a.jsonl"), weight=3), SourceConfig(path=str(tmp_path / "b.jsonl"))]
    cfg = DataConfig(sources=sources, seq_len=100, shuffle_window=32, add_bos=False, add_eos=False, prefetch=0)
    pipeline = make_pipeline(cfg, CharTokenizer(), batch_size=4)
    inputs = np.concatenate([next(pipeline)["inputs"] for _ in range(10)])
    ratio = (inputs == ord("a")).sum() / (inputs == ord("b")).sum()
    assert 2.7 < ratio < 3.3


class _NoSpecialTokens(CharTokenizer):
    bos_id = None


def test_missing_bos_is_a_clear_error():
    with pytest.raises(JaxllmError, match="data.add_bos is true but the tokenizer has no BOS token; set data.add_bos="):
        make_pipeline(DataConfig(), _NoSpecialTokens(), batch_size=2)
    assert isinstance(_NoSpecialTokens(), Tokenizer)


def test_errors_surface_through_the_prefetch_thread(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{}\n")
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "bad.jsonl"))], prefetch=2)
    pipeline = make_pipeline(cfg, CharTokenizer(), batch_size=2)
    with pytest.raises(JaxllmError, match="bad.jsonl yielded no documents"):
        next(pipeline)
    pipeline.close()


def test_config_rejects_negative_window_and_prefetch():
    with pytest.raises(JaxllmError, match=r"data.shuffle_window must be >= 0 \(0 turns it off\), got -1"):
        load_config(None, ["data.shuffle_window=-1"])
