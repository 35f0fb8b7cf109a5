"""Checkpoint file items hold exactly the files jaxllm wrote: never the checkpoint library's markers."""

import json

from etils import epath

from jaxllm.train.checkpoint import FilesHandler, FilesSave


def test_files_item_restores_only_the_files_saved(tmp_path):
    FilesHandler().save(epath.Path(tmp_path), FilesSave({"tokenizer.model": b"sp", "x.json": b"{}"}))
    (tmp_path / "commit_success.txt").write_text("Checkpoint commit was successful")
    (tmp_path / "stray.bin").write_bytes(b"?")
    assert FilesHandler().restore(epath.Path(tmp_path)) == {"tokenizer.model": b"sp", "x.json": b"{}"}


def test_empty_files_item_restores_empty(tmp_path):
    FilesHandler().save(epath.Path(tmp_path), FilesSave({}))
    (tmp_path / "commit_success.txt").write_text("Checkpoint commit was successful")
    assert FilesHandler().restore(epath.Path(tmp_path)) == {}


def test_item_saved_before_the_list_of_files_skips_the_commit_marker(tmp_path):
    (tmp_path / "commit_success.txt").write_text("Checkpoint commit was successful")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {}}))
    (tmp_path / "process_0-of-1.iterator.json").write_text("{}")
    assert FilesHandler().restore(epath.Path(tmp_path)) == {"tokenizer.json": b'{"model": {}}'}
