"""`tfds:` sources on a real TensorFlow Datasets dataset the test builds (ArrayRecord format; no TensorFlow,
no network): every document once, per-process shares, exact resume of the source and of training, errors."""

import itertools
import json
import re
import sys

import jax
import numpy as np
import pytest

from tests.data.data_testing import read_docs
from tests.train.test_loop import _train, micro_config
from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data.sources import make_source
from jaxllm.train.metrics import read_metrics

tfds = pytest.importorskip("tensorflow_datasets")

NAME = "jaxllm_tiny_text"
CHAPTERS = [d["text"] for d in itertools.islice(make_source(SourceConfig(path="builtin:kjv")), 4)]
DOCS = [line for chapter in CHAPTERS for line in chapter.splitlines()][:90]  # verses: ~25 tokens each
TEST_DOCS = ["a held-out document", "and another"]
BAD = [b"", b"not UTF-8 \xff"]  # an empty text is skipped silently, invalid UTF-8 with a warning


class JaxllmTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Text documents and a number; unregistered, so `tfds.data_source` finds it in data_dir as a
    dataset built elsewhere would be found."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "n": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(DOCS + BAD), "test": self._generate_examples(TEST_DOCS)}

    def _generate_examples(self, texts):
        for n, text in enumerate(texts):
            yield n, {"text": text, "n": n}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    JaxllmTinyText(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


def _source(data_dir, **kwargs):
    return make_source(SourceConfig(path=f"tfds:{NAME}", data_dir=data_dir), **kwargs)


def test_every_document_once_and_bad_ones_named(data_dir, caplog):
    assert sorted(read_docs(f"tfds:{NAME}", data_dir=data_dir)) == sorted(DOCS)
    assert len([r for r in caplog.records if "feature 'text' is not valid UTF-8" in r.getMessage()]) == 1
    assert f"tfds:{NAME}: example " in caplog.text
    assert sorted(read_docs(f"tfds:{NAME}", data_dir=data_dir, split="test")) == sorted(TEST_DOCS)


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_take_disjoint_strides_in_a_shuffled_order(data_dir, process_count):
    records = tfds.data_source(NAME, split="train", data_dir=data_dir)
    shares = [read_docs(f"tfds:{NAME}", data_dir=data_dir, process_index=i, process_count=process_count)
              for i in range(process_count)]  # fmt: skip
    assert sorted(sum(shares, [])) == sorted(DOCS)  # disjoint and complete
    for i, share in enumerate(shares):
        stride = [records[j]["text"].decode("utf-8", "replace") for j in range(i, len(records), process_count)]
        assert set(share) == set(stride) - {"", "not UTF-8 \ufffd"}  # process i takes i, i+P, ...
    it = iter(_source(data_dir, seed=3, process_index=1, process_count=process_count))
    epoch0, epoch1 = ([next(it)["text"] for _ in shares[1]] for _ in range(2))
    assert sorted(epoch0) == sorted(epoch1) == sorted(shares[1]) and epoch0 != epoch1  # shuffled anew each epoch


@pytest.mark.parametrize("skip", [0, 6, 40])
def test_source_resume_is_exact_across_epochs(data_dir, skip):
    it = iter(_source(data_dir, seed=4, process_index=0, process_count=2))
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["text"] for _ in range(60)]  # about 45 per epoch for this process: crosses an epoch
    fresh = iter(_source(data_dir, seed=4, process_index=0, process_count=2))
    fresh.set_state(state)
    assert [next(fresh)["text"] for _ in range(60)] == expected


def test_training_from_tfds_resumes_exactly(data_dir, tmp_path):
    """20 straight steps vs 10 + 10 (test_loop's protocol and programs on one device: compiled once per session);
    the 90 verses are read several times over."""
    source = [f"data.sources.0.path=tfds:{NAME}", f"data.sources.0.data_dir={data_dir}", "data.shuffle_window=8",
              "checkpoint.every=10"]  # fmt: skip
    one = jax.devices()[:1]
    straight, straight_params = _train(micro_config(tmp_path / "straight", *source), devices=one)
    cfg = micro_config(tmp_path / "resumed", *source)
    first, _ = _train(cfg, devices=one, stop_at_step=10)
    assert first["end_step"] == 10 and first["stopped_early"]
    (saved,) = [json.loads(p.read_text()) for p in (tmp_path / "resumed").rglob("*iterator.json")]
    assert saved["layout"]["sources"] == [f"tfds:{NAME}"]
    source_state = saved["iterator"]
    assert _find(source_state, "epoch") >= 1 and _find(source_state, "index") > 0  # resumes mid-source, mid-epoch
    second, params = _train(cfg, devices=one)
    assert second["start_step"] == 10 and second["end_step"] == 20
    jax.tree.map(np.testing.assert_array_equal, params, straight_params)
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")} == straight["losses"]


def _find(state, key):
    """The value of `key` somewhere in a nested iterator state (the source's, under the pipeline's)."""
    if isinstance(state, dict):
        if key in state:
            return state[key]
        found = [v for v in (_find(child, key) for child in state.values()) if v is not None]
        return found[0] if found else None
    return None


def test_errors_are_one_line_and_name_the_fix(data_dir, monkeypatch):
    where = re.escape(f"in data_dir {data_dir}")
    fix = "build the dataset with file_format='array_record' and set data_dir to where it was built"
    with pytest.raises(JaxllmError, match=f"tfds:missing: cannot open split 'train' {where} .*; {fix}"):
        read_docs("tfds:missing", data_dir=data_dir)
    with pytest.raises(JaxllmError) as error:
        read_docs("tfds:missing")
    assert "TFDS's default data_dir" in str(error.value)
    assert "\n" not in str(error.value)  # TFDS's own message goes on to list its whole catalog
    with pytest.raises(JaxllmError, match=f"tfds:{NAME}: cannot open split 'valid' {where} .*Unknown split 'valid'"):
        read_docs(f"tfds:{NAME}", data_dir=data_dir, split="valid")
    with pytest.raises(JaxllmError, match=rf"tfds:{NAME} has no feature 'body' \(features: n, text\); set text_field"):
        read_docs(f"tfds:{NAME}", data_dir=data_dir, text_field="body")
    with pytest.raises(JaxllmError, match=r"example \d+: feature 'n' holds int \d+, expected a string; fix it or set"):
        read_docs(f"tfds:{NAME}", data_dir=data_dir, text_field="n", on_bad_record="error")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(JaxllmError, match=rf"tfds:{NAME} needs tensorflow_datasets; pip install 'jaxllm\[data\]'"):
        read_docs(f"tfds:{NAME}", data_dir=data_dir)
