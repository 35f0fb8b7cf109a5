"""`jaxllm data preview`: the first training rows, as text with the trained tokens marked, or as JSON."""

import json

import numpy as np

from jaxllm.cli import main
from jaxllm.config import load_config
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer


def test_sft_rows_as_text_mark_exactly_the_replies(capsys):
    assert main(["data", "preview", "configs/tiny-sft.yaml", "-n", "2", "train.init_from=null"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("row 0: ") and "trained tokens ⟦marked⟧" in out[0]
    examples = [line for line in out if line.startswith("  [")]
    assert examples and all(line.count("⟦") == 1 and line.endswith("⟦" + line.split("⟦")[1]) for line in examples)
    for line in examples:  # the marked part is the assistant's reply and its </s>, after the assistant tag
        before, reply = line.split("⟦")
        assert before.endswith("<|assistant|>\\n") and reply.endswith("</s>⟧\\n")


def test_json_rows_are_the_batches_rows(capsys):
    overrides = ["train.init_from=null", "train.batch_size=2", "data.seq_len=64"]
    assert main(["data", "preview", "configs/tiny-sft.yaml", "-n", "3", "--json", *overrides]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cfg = load_config("configs/tiny-sft.yaml", overrides)
    pipeline = make_pipeline(cfg.data, load_tokenizer("builtin:kjv-sp4k"), 2, num_epochs=1)
    batches = [next(pipeline), next(pipeline)]
    pipeline.close()
    expected = [{k: v[r] for k, v in b.items()} for b in batches for r in range(2)][:3]
    assert len(rows) == 3
    for row, want in zip(rows, expected):
        assert row["input_ids"] == want["inputs"].tolist() and row["segment_ids"] == want["segment_ids"].tolist()
        assert row["positions"] == want["positions"].tolist() and row["loss_mask"] == want["loss_mask"].tolist()
        assert row["labels"] == np.where(want["loss_mask"] > 0, want["targets"], -100).tolist()


def test_other_objectives_preview_too(capsys):
    assert main(["data", "preview", "configs/tiny-t5-span.yaml", "-n", "1", "data.seq_len=40"]) == 0
    encoder, decoder = capsys.readouterr().out.splitlines()[1:3]
    assert encoder.startswith("  [1] encoder: ") and "<id:" in encoder  # sentinels above the vocabulary
    assert decoder.startswith("      decoder: ⟦<id:") and decoder.endswith("</s>⟧")
    assert main(["data", "preview", "configs/tiny.yaml", "-n", "1", "data.seq_len=32"]) == 0
    clm = capsys.readouterr().out.splitlines()[1]
    assert clm.startswith("  [1] <s>⟦") and clm.endswith("⟧")  # every token after BOS is a target


def test_a_row_count_below_one_is_refused(capsys):
    assert main(["data", "preview", "configs/tiny-sft.yaml", "-n", "0"]) == 2
    assert capsys.readouterr().err == "error: -n must be at least 1, got 0\n"
