"""Sequence-level distillation data: `jaxllm distill-data` writes a teacher's completions of a source's prompts."""

import dataclasses
import json

import pytest

from jaxllm.cli import main
from jaxllm.config import GenerateConfig
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer.generate import generate_text
from jaxllm.infer.load import load_model
from tests.conftest import random_params, tiny_model_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A jaxllm run converted from a random tiny Llama with the bundled tokenizer (no training needed)."""
    from jaxllm.convert.hf import hf_to_jaxllm, save_hf

    root = tmp_path_factory.mktemp("teacher")
    cfg = tiny_model_config(family="llama", vocab_size=4096)
    save_hf(random_params(cfg, std=0.3), cfg, root / "hf", load_tokenizer("builtin:kjv-sp4k").files())
    return hf_to_jaxllm(root / "hf", root / "run")


def test_distill_data_writes_the_teachers_completions_of_cut_prompts(teacher, tmp_path, capsys):
    records = ["In the beginning God created the heaven and the earth.", "Short.",
               "And the earth was without form, and void; and darkness was upon the face of the deep.",
               "And God said, Let there be light: and there was light."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"verse": r}) + "\n" for r in records))
    out = tmp_path / "kd.jsonl"
    assert main(["distill-data", "--teacher", str(teacher), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--field", "verse", "--prompt-tokens", "4", "--limit", "3", "--batch-size", "2",
                 "--max-new-tokens", "6", "--temperature", "0", "--out", str(out)]) == 0
    assert "wrote 3 completions" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    # "Short." has no more than 4 tokens: nothing to continue, skipped.
    kept = [r for r in records if len(tokenizer.encode(r)) > 4][:3]
    assert [r["prompt"] for r in rows] == [tokenizer.decode(tokenizer.encode(r)[:4]) for r in kept]
    assert all(r["text"] == r["prompt"] + r["completion"] for r in rows)
    # What `jaxllm generate` gives for those prompts (greedy), one at a time.
    loaded = load_model(teacher)
    gen = dataclasses.replace(GenerateConfig(), max_new_tokens=6, temperature=0.0)
    for row in rows:
        (expected,) = generate_text(loaded.graphdef, loaded.params, loaded.config, loaded.tokenizer, [row["prompt"]], gen)
        assert row["completion"] == expected


def test_distill_data_with_no_prompts_is_a_one_line_error(teacher, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "Hi."}) + "\n")
    assert main(["distill-data", "--teacher", str(teacher), "--prompts", str(tmp_path / "empty.jsonl"),
                 "--prompt-tokens", "50", "--out", str(tmp_path / "kd.jsonl")]) == 2
    assert "error: no prompts from" in capsys.readouterr().err
    assert not (tmp_path / "kd.jsonl").exists()
