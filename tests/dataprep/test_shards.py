"""Tokenised ArrayRecord shards: written deterministically whatever the worker count, read in training with the
same batches as the raw text, a global shuffle, and a resume position that any process count continues."""

import json

import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import DataConfig, JaxllmError, ObjectiveConfig, SourceConfig, load_config
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.dataprep.shards import tokenize_to_shards
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.loop import Trainer
from tests.data.data_testing import write_jsonl
from tests.train.test_loop import MICRO

SEQ = 32


def _texts(n: int = 60) -> list[str]:
    words = "in the beginning god created heaven and earth light darkness day night waters firmament".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, rng.integers(1, 40))) + f" ({i}) é ü ∑" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:kjv-sp4k")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents in two jsonl files, tokenised (one worker) into shards of 7 rows."""
    root = tmp_path_factory.mktemp("corpus")
    texts = _texts()
    write_jsonl(root / "a.jsonl", texts[:25])
    write_jsonl(root / "b.jsonl.gz", texts[25:], compress=True)
    meta = tokenize_to_shards(f"{root}/*.jsonl*", str(root / "shards"), "builtin:kjv-sp4k", SEQ, workers=1,
                              rows_per_shard=7)
    return root, meta


def _data(path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(path=str(path))], seq_len=SEQ, prefetch=0, **kw)


def _batches(cfg, tokenizer, batch_size, n=None, process_index=0, process_count=1, num_epochs=None, state=None):
    pipeline = make_pipeline(cfg, tokenizer, batch_size, process_index, process_count, num_epochs=num_epochs)
    if state is not None:
        pipeline.set_state(state)
    out = [next(pipeline) for _ in range(n)] if n is not None else list(pipeline)
    state = pipeline.get_state()
    pipeline.close()
    return out, state


def _cat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_metadata_and_workers_do_not_change_the_shards(corpus, tmp_path):
    root, meta = corpus
    assert meta["sources"]["documents"] == 60 and meta["sources"]["files"] == [f"{root}/a.jsonl", f"{root}/b.jsonl.gz"]
    assert meta["seq_len"] == SEQ and meta["dtype"] == "<u2" and meta["rows"] == sum(s["rows"] for s in meta["shards"])
    assert [s["rows"] for s in meta["shards"][:-1]] == [7] * (len(meta["shards"]) - 1) and len(meta["shards"]) > 2
    assert json.loads((root / "shards" / "metadata.json").read_text())["tokens"] == meta["tokens"]
    assert (root / "shards" / "tokenizer" / "tokenizer.model").is_file()
    again = tokenize_to_shards(f"{root}/*.jsonl*", str(tmp_path / "two"), "builtin:kjv-sp4k", SEQ, workers=2,
                               rows_per_shard=7)
    for shard in meta["shards"]:
        assert (tmp_path / "two" / shard["file"]).read_bytes() == (root / "shards" / shard["file"]).read_bytes()
    assert again["tokens"] == meta["tokens"]
    with pytest.raises(JaxllmError, match="already holds tokenised shards.*--overwrite"):
        tokenize_to_shards(f"{root}/a.jsonl", str(tmp_path / "two"), "builtin:kjv-sp4k", SEQ, workers=1)


def test_shard_batches_equal_raw_text_batches(corpus, tokenizer):
    root, meta = corpus
    # The raw pipeline reads the two files in its own order: give it the documents in the shards' order.
    write_jsonl(root / "all.jsonl", _texts())
    raw, _ = _batches(_data(root / "all.jsonl", shuffle_window=0), tokenizer, 4, num_epochs=1)
    shards, _ = _batches(_data(root / "shards", shuffle_window=0), tokenizer, 4, num_epochs=1)
    assert len(raw) == len(shards) == -(-meta["rows"] // 4)
    for a, b in zip(raw, shards):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
    assert int(sum(b["loss_mask"].sum() for b in shards)) == meta["tokens"]


def test_global_shuffle_and_batches_equal_on_any_process_count(corpus, tokenizer):
    root, meta = corpus
    cfg, rows = _data(root / "shards", shuffle_window=1, seed=3), meta["rows"]
    one, _ = _batches(cfg, tokenizer, 4, n=2 * rows // 4 + 1)  # a little over two epochs
    two = [_batches(cfg, tokenizer, 2, n=len(one), process_index=p, process_count=2)[0] for p in range(2)]
    for j, batch in enumerate(one):
        for k in batch:
            np.testing.assert_array_equal(np.concatenate([two[0][j][k], two[1][j][k]]), batch[k])
    # Every epoch is a permutation of the whole corpus, a different one each epoch.
    plain, _ = _batches(_data(root / "shards", shuffle_window=0), tokenizer, rows, n=1)
    order = {row.tobytes(): i for i, row in enumerate(plain[0]["inputs"])}
    assert len(order) == rows  # distinct rows: positions in the corpus can be told apart
    seen = [order[row.tobytes()] for row in _cat(one)["inputs"]]
    assert sorted(seen[:rows]) == sorted(seen[rows : 2 * rows]) == list(range(rows))
    assert seen[:rows] != list(range(rows)) and seen[:rows] != seen[rows : 2 * rows]


def test_state_saved_on_two_processes_resumes_on_one_and_four(corpus, tokenizer):
    root, _ = corpus
    cfg = _data(root / "shards", shuffle_window=1, seed=5)
    straight, _ = _batches(cfg, tokenizer, 4, n=8)
    states = [_batches(cfg, tokenizer, 2, n=3, process_index=p, process_count=2)[1] for p in range(2)]
    assert states[0]["iterator"] == states[1]["iterator"] == {"global_row": 12, "row_in_batch": 0}
    resumed_one, _ = _batches(cfg, tokenizer, 4, n=5, state=states[0])
    resumed_four = [_batches(cfg, tokenizer, 1, n=5, process_index=p, process_count=4, state=states[1])[0]
                    for p in range(4)]  # fmt: skip
    for j in range(5):
        for k in straight[0]:
            np.testing.assert_array_equal(resumed_one[j][k], straight[3 + j][k])
            np.testing.assert_array_equal(np.concatenate([r[j][k] for r in resumed_four]), straight[3 + j][k])
    # Documents keep their strict layout: a state of theirs is refused on another process count.
    write_jsonl(root / "docs.jsonl", _texts(8))
    _, doc_state = _batches(_data(root / "docs.jsonl"), tokenizer, 2, n=1, process_index=0, process_count=2)
    with pytest.raises(JaxllmError, match="process_count=2, but this run has process_count=1"):
        _batches(_data(root / "docs.jsonl"), tokenizer, 4, n=1, state=doc_state)


def test_a_finite_pass_gives_every_process_the_same_number_of_batches(corpus, tokenizer):
    root, meta = corpus
    cfg = _data(root / "shards", shuffle_window=0)
    rows, per_process = meta["rows"], [_batches(cfg, tokenizer, 3, process_index=p, process_count=2, num_epochs=1)[0]
                                       for p in range(2)]  # fmt: skip
    assert len(per_process[0]) == len(per_process[1]) == -(-rows // 6)
    last = np.concatenate([per_process[0][-1]["segment_ids"], per_process[1][-1]["segment_ids"]])
    assert (last[rows % 6 :] == 0).all() and (last[: rows % 6] > 0).any()  # rows past the end are padding


@pytest.mark.parametrize("change, message", [
    ({"seq_len": 16}, "holds rows of 32 tokens but data.seq_len=16; set data.seq_len=32"),
    ({"add_eos": False}, "tokenised with add_eos=true but data.add_eos=false"),
    ({"objective": ObjectiveConfig(name="mlm")}, "pre-tokenised clm rows, which the mlm objective cannot use"),
])  # fmt: skip
def test_mismatched_config_is_a_one_line_error(corpus, tokenizer, change, message):
    root, _ = corpus
    cfg = DataConfig(**{"sources": [SourceConfig(path=str(root / "shards"))], "seq_len": SEQ, **change})
    with pytest.raises(JaxllmError, match=message):
        make_pipeline(cfg, tokenizer, 2)


def test_other_tokenizer_and_mixed_sources_are_refused(corpus, tmp_path):
    root, _ = corpus
    (tmp_path / "tok.json").write_text(_hf_tokenizer_json())
    other = load_tokenizer(str(tmp_path / "tok.json"))
    with pytest.raises(JaxllmError, match=r"tokenised with builtin:kjv-sp4k \(sha256 [0-9a-f]{12}\), but this run's "
                                          r"tokenizer is .*tok.json .*set tokenizer.path=.*shards/tokenizer"):
        make_pipeline(DataConfig(sources=[SourceConfig(path=str(root / "shards"))], seq_len=SEQ, add_bos=False,
                                 add_eos=False), other, 2)  # fmt: skip
    mixed = DataConfig(sources=[SourceConfig(path=str(root / "shards")), SourceConfig(path="builtin:kjv")], seq_len=SEQ)
    with pytest.raises(JaxllmError, match="mixes pre-tokenised shards with other sources"):
        make_pipeline(mixed, load_tokenizer("builtin:kjv-sp4k"), 2)


def _hf_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def test_training_from_shards_equals_training_from_raw_text(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", _texts(120))
    assert main(["data", "tokenize", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "shards"),
                 "--tokenizer", "builtin:kjv-sp4k", "--seq-len", str(SEQ), "--workers", "1"]) == 0  # fmt: skip
    losses = {}
    for name in ("docs.jsonl", "shards"):
        cfg = load_config(None, MICRO + [
            f"run_dir={tmp_path / ('run-' + name)}", "train.steps=3", "train.sample_prompt=null",
            "data.shuffle_window=0", f"data.sources=[{{path: {tmp_path / name}}}]",
        ])
        trainer = Trainer(cfg, devices=jax.devices()[:1])
        try:
            losses[name] = trainer.run()["losses"]
        finally:
            trainer.close()
    assert losses["shards"] == losses["docs.jsonl"] and len(losses["shards"]) == 3
    # A checkpoint's data state as two processes would have saved it: any process count restores a global one.
    for name, restored in (("shards", True), ("docs.jsonl", False)):
        data = tmp_path / f"run-{name}" / "checkpoints" / "3" / "data"
        for path in data.glob("process_0-of-1.*"):
            for p in range(2):
                (data / path.name.replace("0-of-1", f"{p}-of-2")).write_bytes(path.read_bytes())
            path.unlink()
        checkpointer = Checkpointer(tmp_path / f"run-{name}" / "checkpoints", read_only=True)
        try:
            if restored:
                assert checkpointer.restore_meta(3).data_state["iterator"] == {"global_row": 24, "row_in_batch": 0}
            else:
                with pytest.raises(JaxllmError, match="written by a run with a different number of processes"):
                    checkpointer.restore_meta(3)
        finally:
            checkpointer.close()
