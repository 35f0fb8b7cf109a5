"""`hf:` sources on local datasets the test writes (`tfds:` sources: test_tfds.py)."""

import json

import pytest

from tests.data.data_testing import read_docs, write_jsonl
from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data.sources import make_source

DOCS = [f"hub document {i}" for i in range(30)]


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    """A directory of three jsonl files: `datasets` reads it as a local dataset with three shards."""
    path = tmp_path_factory.mktemp("hf_jsonl")
    for shard in range(3):
        write_jsonl(path / f"part-{shard}.jsonl", DOCS[shard * 10 : (shard + 1) * 10])
    return path


def test_hf_directory_of_jsonl(jsonl_dir):
    assert read_docs(f"hf:{jsonl_dir}") == DOCS


@pytest.mark.parametrize("process_count", [2, 3])
def test_hf_shards_are_disjoint_and_complete(jsonl_dir, process_count):
    shards = [read_docs(f"hf:{jsonl_dir}", process_index=i, process_count=process_count) for i in range(process_count)]
    assert all(shards) and sorted(sum(shards, [])) == sorted(DOCS)


@pytest.mark.parametrize("skip", [0, 4, 17])
def test_hf_resume_is_exact_across_epochs(jsonl_dir, skip):
    cfg = SourceConfig(path=f"hf:{jsonl_dir}")
    it = iter(make_source(cfg, process_index=0, process_count=2))
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["text"] for _ in range(25)]  # 15 per epoch for this process: crosses an epoch
    fresh = iter(make_source(cfg, process_index=0, process_count=2))
    fresh.set_state(state)
    assert [next(fresh)["text"] for _ in range(25)] == expected


def test_hf_saved_dataset_and_bad_values(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["one", None, "three"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "saved"))
    assert read_docs(f"hf:{tmp_path / 'saved'}", text_field="body") == ["one", "three"]
    assert "example 2: field 'body' holds NoneType" in caplog.text
    with pytest.raises(JaxllmError, match="has no column 'text' \\(columns: body, n\\); set text_field"):
        read_docs(f"hf:{tmp_path / 'saved'}")


def test_hf_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(JaxllmError, match="hf:.*nothing-here: cannot load split 'train'"):
        read_docs(f"hf:{tmp_path / 'nothing-here'}")
