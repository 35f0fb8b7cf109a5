"""The sft batch format: records -> packed rows whose loss mask covers exactly the assistant's tokens."""

import json
import logging

import numpy as np
import pytest

from jaxllm.config import DataConfig, JaxllmError, ObjectiveConfig, SourceConfig
from jaxllm.data.chat import ChatEncoder
from jaxllm.data.chat_template import load_chat_template
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer("builtin:kjv-sp4k")
CONVERSATION = {"messages": [
    {"role": "system", "content": "Answer with the book's name."},
    {"role": "user", "content": "Which book: In the beginning God created the heaven and the earth."},
    {"role": "assistant", "content": "Genesis"},
    {"role": "user", "content": "And: The LORD is my shepherd; I shall not want."},
    {"role": "assistant", "content": "Psalms"},
]}
RECORDS = [
    CONVERSATION,
    {"prompt": "Continue: And God said,", "completion": " Let there be light: and there was light."},
    {"text": "Jesus wept."},
    {"messages": [{"role": "user", "content": "Quote John 11:35."}, {"role": "assistant", "content": "Jesus wept."}]},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(path, seq_len=96, **objective):
    objective = {"name": "sft", "chat_template": "builtin:zephyr", **objective}
    return DataConfig(sources=[SourceConfig(path=path)], seq_len=seq_len, shuffle_window=0, prefetch=0,
                      objective=ObjectiveConfig(**objective))


def _rows(cfg, batch_size=2):
    pipeline = make_pipeline(cfg, TOKENIZER, batch_size, num_epochs=1)
    try:
        return [{k: v[r] for k, v in batch.items()} for batch in pipeline for r in range(batch_size)]
    finally:
        pipeline.close()


def _examples(rows):
    """Each packed example as (input ids, target ids, loss mask), in row order."""
    out = []
    for row in rows:
        for s in sorted(set(row["segment_ids"].tolist()) - {0}):
            at = row["segment_ids"] == s
            assert np.array_equal(row["positions"][at], np.arange(at.sum()))  # positions restart per example
            out.append((row["inputs"][at].tolist(), row["targets"][at].tolist(), row["loss_mask"][at].tolist()))
    return out


def _expected(record, add_bos=True):
    encoder = ChatEncoder(TOKENIZER, load_chat_template("builtin:zephyr"),
                          bos_id=TOKENIZER.bos_id if add_bos else None)  # fmt: skip
    ids, mask = encoder.encode(record)
    return ids[:-1], ids[1:], [float(m) for m in mask[1:]]


def test_packed_rows_hold_whole_examples_with_their_assistant_mask(tmp_path):
    rows = _rows(_config(_write(tmp_path / "d.jsonl", RECORDS)))
    examples = _examples(rows)
    assert sorted(examples) == sorted(_expected(r) for r in RECORDS)  # every example whole, none split
    assert len(rows) < len(RECORDS)  # several examples share a row
    for row in rows:
        assert not row["loss_mask"][row["segment_ids"] == 0].any()  # padding trains nothing
    # What the loss sees of the conversation: both assistant replies and their end-of-turn token, nothing else.
    inputs, targets, mask = next(e for e in examples if TOKENIZER.decode(e[0]).startswith("<|system|>"))
    trained = [t for t, m in zip(targets, mask) if m]
    assert TOKENIZER.decode(trained) == "GenesisPsalms"
    assert trained.count(TOKENIZER.eos_id) == 2
    # Plain text: BOS first (data.add_bos), loss on every token and the EOS; prompt + completion: on the completion.
    text = next(e for e in examples if TOKENIZER.decode(e[0]) == "Jesus wept.")
    assert text[0][0] == TOKENIZER.bos_id and all(text[2]) and text[1][-1] == TOKENIZER.eos_id
    completion = next(e for e in examples if TOKENIZER.decode(e[0]).startswith("Continue"))
    assert TOKENIZER.decode([t for t, m in zip(completion[1], completion[2]) if m]) == (
        "Let there be light: and there was light.")


def test_unpacked_rows_and_train_on_all(tmp_path):
    path = _write(tmp_path / "d.jsonl", RECORDS)
    rows = _rows(_config(path, packing=False))
    assert len(rows) == len(RECORDS) and all(set(r["segment_ids"].tolist()) <= {0, 1} for r in rows)
    assert sorted(_examples(rows)) == sorted(_expected(r) for r in RECORDS)
    everything = _examples(_rows(_config(path, train_on_all=True)))
    assert all(all(m) for _, _, m in everything)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", RECORDS)
    longest = max(len(_expected(r)[0]) for r in RECORDS)
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sft"):
        truncated = _examples(_rows(_config(path, seq_len=longest - 5)))
    assert "1 examples truncated to data.seq_len" in caplog.text
    conversation = _expected(CONVERSATION)
    assert [e for e in truncated if len(e[0]) == longest - 5] == [tuple(x[: longest - 5] for x in conversation)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sft"):
        dropped = _examples(_rows(_config(path, seq_len=longest - 5, overlong="drop")))
    assert "1 examples dropped: longer than data.seq_len" in caplog.text
    assert sorted(dropped) == sorted(_expected(r) for r in RECORDS[1:])
    # A prompt that fills the row leaves nothing to train on: skipped, counted.
    caplog.clear()
    prompt_only = [{"prompt": "In the beginning God created the heaven and the earth. " * 4, "completion": " Amen."}]
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sft"):
        with pytest.raises(JaxllmError, match="yielded no documents"):
            _rows(_config(_write(tmp_path / "p.jsonl", prompt_only), seq_len=16))
    assert "examples skipped: no token to train on" in caplog.text


def test_bad_records_are_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [RECORDS[0], {"conversation": []}])
    with pytest.raises(JaxllmError, match=r"bad.jsonl:2: the record has none of the fields 'messages', 'prompt' \+ "
                                          r"'completion', 'text' \(it has 'conversation'\); set data.objective"):
        _rows(DataConfig(**{**_config(path).__dict__, "on_bad_record": "error"}))
    bad_message = [{"messages": [{"role": "user"}]}]
    with pytest.raises(JaxllmError, match=r"m.jsonl:1: field 'messages': each message needs a 'role' string"):
        _rows(DataConfig(**{**_config(_write(tmp_path / "m.jsonl", bad_message)).__dict__, "on_bad_record": "error"}))
    # Conversations without a template are a configuration error, not a bad record.
    with pytest.raises(JaxllmError, match="need a chat template"):
        _rows(_config(path, chat_template=None))


def test_parquet_and_hf_sources_give_the_same_rows_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [r for r in RECORDS if "messages" in r]
    expected = _examples(_rows(_config(_write(tmp_path / "d.jsonl", records))))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert _examples(_rows(_config(str(tmp_path / "d.parquet")))) == expected
    (tmp_path / "hf").mkdir()
    _write(tmp_path / "hf" / "train.jsonl", records)
    assert _examples(_rows(_config(f"hf:{tmp_path / 'hf'}"))) == expected


def test_the_tokenizers_own_template_is_used_and_travels_with_it(tmp_path):
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    tokenizer.chat_template = load_chat_template("builtin:zephyr").source
    from jaxllm.data.tokenizer import load_tokenizer_from_files

    again = load_tokenizer_from_files(tokenizer.files())
    assert again.chat_template == tokenizer.chat_template
    cfg = _config(_write(tmp_path / "d.jsonl", RECORDS), chat_template=None)
    pipeline = make_pipeline(cfg, again, 2, num_epochs=1)
    try:
        assert sorted(_examples([{k: v[r] for k, v in b.items()} for b in pipeline for r in range(2)])) == sorted(
            _expected(r) for r in RECORDS)
    finally:
        pipeline.close()


def test_a_builtin_templates_tokens_are_added_and_encode_as_one_id(tmp_path):
    from jaxllm.data.objectives import tokens_to_add

    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    cfg = _config(_write(tmp_path / "d.jsonl", RECORDS[:1]), chat_template="builtin:chatml")
    needed = tokens_to_add(cfg, tokenizer)
    assert needed == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.add_special_tokens(needed) == needed and tokenizer.vocab_size == 4098
    assert tokenizer.chat_template == load_chat_template("builtin:chatml").source  # saved with the run
    pipeline = make_pipeline(cfg, tokenizer, 1, num_epochs=1)
    (row,) = [{k: v[0] for k, v in b.items()} for b in pipeline]
    pipeline.close()
    (inputs, targets, mask), = _examples([row])
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    assert inputs.count(start) == 5 and (inputs + targets[-1:]).count(end) == 5  # one id per turn marker
    trained = [t for t, m in zip(targets, mask) if m]
    assert trained.count(end) == 2 and tokenizer.decode(trained) == "GenesisPsalms"
