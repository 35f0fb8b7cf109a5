"""The pipeline for each objective: shapes, packing, encoder/decoder alignment, exact resume, dynamic
masking, special ids and the vocabulary check."""

import json

import numpy as np
import pytest

from tests.data.data_testing import CharTokenizer, write_jsonl
from jaxllm.config import ConfigError, DataConfig, JaxllmError, ObjectiveConfig, SourceConfig, load_config
from jaxllm.config import config_from_yaml_text, dump_yaml, from_dict
from jaxllm.data.objectives import batch_spec, check_vocab_size, encoder_decoder_lengths, extra_token_count, special_ids
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer

OBJECTIVES = ["clm", "mlm", "span", "bart", "ul2"]


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return load_tokenizer("builtin:kjv-sp4k")


def _cfg(name, path="builtin:kjv-valid", objective=None, **kwargs):
    """A small DataConfig; `objective` holds further objective fields as in YAML."""
    defaults = dict(sources=[SourceConfig(path=path)], seq_len=64, shuffle_window=0, prefetch=0)
    objective = from_dict(ObjectiveConfig, {"name": name, **(objective or {})})
    return DataConfig(**{**defaults, **kwargs}, objective=objective)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_batch_shapes_and_dtypes(kjv_tokenizer, name):
    cfg = _cfg(name)
    pipeline = make_pipeline(cfg, kjv_tokenizer, batch_size=3)
    batch = next(pipeline)
    pipeline.close()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_spec(cfg, 3)
    ids = special_ids(cfg, kjv_tokenizer)
    assert all(int(v.max()) < ids.vocab_size for k, v in batch.items() if k.endswith(("inputs", "targets")))


def test_batch_spec_lengths():
    spec = batch_spec(DataConfig(seq_len=512, objective=ObjectiveConfig(name="span")), 8)
    assert spec["encoder_inputs"] == ((8, 512), np.dtype(np.int32))
    assert spec["decoder_targets"] == ((8, 114), np.dtype(np.int32))  # T5's targets length for 512
    assert spec["decoder_loss_mask"] == ((8, 114), np.dtype(np.float32))


def test_mlm_packs_like_clm_without_the_shift(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", ["abc", "de", "fghijkl"])
    cfg = _cfg("mlm", str(tmp_path / "tiny.jsonl"), seq_len=6)
    batches = list(make_pipeline(cfg, CharTokenizer(), batch_size=2, num_epochs=1))
    a, b, c, d, e, f, g, h, i, j, k, l = range(97, 109)  # noqa: E741
    # [1 a b c 2] [1 d e 2] [1 f g h i j k l 2] in rows of 6, long documents continuing on the next row.
    targets = np.concatenate([batch["targets"] for batch in batches])
    segments = np.concatenate([batch["segment_ids"] for batch in batches])
    np.testing.assert_array_equal(targets, [[1, a, b, c, 2, 1], [d, e, 2, 1, f, g], [h, i, j, k, l, 2], [0] * 6])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 1, 1, 2], [1, 1, 1, 2, 2, 2], [1] * 6, [0] * 6])
    loss_mask = np.concatenate([batch["loss_mask"] for batch in batches])
    # Maskable: the letters only. Row 1 has 3 (round(0.45) = 0, at least 1), row 2 has 4 (round(0.6) = 1),
    # row 3 has 5 (round(0.75) = 1): one prediction each, never on BOS/EOS or padding.
    np.testing.assert_array_equal(loss_mask.sum(axis=1), [1, 1, 1, 0])
    assert (loss_mask[targets <= 2] == 0).all()
    inputs = np.concatenate([batch["inputs"] for batch in batches])
    np.testing.assert_array_equal(inputs[loss_mask == 0], targets[loss_mask == 0])


def _reconstruct(encoder, targets, sentinels):
    """The chunk a span-corrupted example came from: each sentinel of the encoder replaced by its span."""
    spans, current = {}, None
    for token in targets[:-1]:  # drop EOS
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out = []
    for token in encoder[:-1]:
        out += spans.get(token, [token]) if token in sentinels else [token]
    return out


def _segments(row_ids, values):
    return {k: values[row_ids == k].tolist() for k in np.unique(row_ids) if k > 0}


def _examples(batches, prefix):
    """Per packed example: (encoder tokens, decoder targets, decoder inputs), by segment id."""
    out = []
    for batch in batches:
        for r in range(len(batch["encoder_inputs"])):
            enc = _segments(batch["encoder_segment_ids"][r], batch["encoder_inputs"][r])
            dec = _segments(batch["decoder_segment_ids"][r], batch["decoder_targets"][r])
            dec_in = _segments(batch["decoder_segment_ids"][r], batch["decoder_inputs"][r])
            assert enc.keys() == dec.keys()  # every example has both sides in the same row
            out += [(enc[k], dec[k], dec_in[k]) for k in enc]
    return out


def _chunks(tokenizer, path, size):
    from tests.data.data_testing import read_docs

    docs = [tokenizer.encode(text) for text in read_docs(path)]
    return sorted(tuple(doc[i : i + size]) for doc in docs for i in range(0, len(doc), size))


@pytest.mark.parametrize("name", ["span", "ul2"])
def test_encoder_and_decoder_segments_are_the_same_example(kjv_tokenizer, name):
    cfg = _cfg(name)
    ids, lengths = special_ids(cfg, kjv_tokenizer), encoder_decoder_lengths(cfg)
    batches = list(make_pipeline(cfg, kjv_tokenizer, batch_size=4, num_epochs=1))
    sentinels, modes = set(ids.sentinels), {v: k for k, v in ids.modes.items()}
    rebuilt = []
    for encoder, targets, decoder_inputs in _examples(batches, name):
        assert decoder_inputs == [ids.decoder_start, *targets[:-1]]  # shifted within the example
        if name == "ul2":
            mode, encoder = modes[encoder[0]], encoder[1:]
            if mode == "[S]":
                rebuilt.append(tuple(encoder[:-1] + targets[:-1]))
                continue
        rebuilt.append(tuple(_reconstruct(encoder, targets, sentinels)))
    # Undoing the corruption of every (encoder segment k, decoder segment k) pair gives back exactly
    # the chunks of the documents, each once: no example is split or paired with another's other side.
    assert sorted(rebuilt) == _chunks(kjv_tokenizer, "builtin:kjv-valid", lengths.chunk)


def test_bart_segments_are_the_same_example(kjv_tokenizer):
    cfg = _cfg("bart")
    ids, lengths = special_ids(cfg, kjv_tokenizer), encoder_decoder_lengths(cfg)
    examples = _examples(make_pipeline(cfg, kjv_tokenizer, batch_size=4, num_epochs=1), "bart")
    bos, eos = kjv_tokenizer.bos_id, kjv_tokenizer.eos_id
    for encoder, targets, decoder_inputs in examples:
        assert targets[0] == bos and targets[-1] == eos and decoder_inputs == [eos, *targets[:-1]]
        text = targets[1:-1]
        kept = [t for t in encoder[1:-1] if t != ids.mask]
        # The encoder holds the same text, permuted and with round(0.3 * n) tokens infilled.
        assert len(kept) == len(text) - round(0.3 * len(text))
        assert not (np.bincount(kept, minlength=4096) > np.bincount(text, minlength=4096)).any()
    assert sorted(tuple(t[1:-1]) for _, t, _ in examples) == _chunks(kjv_tokenizer, "builtin:kjv-valid", lengths.chunk)


@pytest.mark.parametrize("name, taken, prefetch", [("mlm", 5, 2), ("span", 7, 0), ("bart", 3, 2), ("ul2", 4, 0)])
def test_resume_is_exact(kjv_tokenizer, name, taken, prefetch):
    cfg = _cfg(name, shuffle_window=16, prefetch=prefetch, seed=3)
    pipeline = make_pipeline(cfg, kjv_tokenizer, batch_size=3)
    for _ in range(taken):
        next(pipeline)
    state = json.loads(json.dumps(pipeline.get_state()))  # as a checkpoint stores it
    expected = [next(pipeline) for _ in range(4)]
    pipeline.close()
    fresh = make_pipeline(cfg, kjv_tokenizer, batch_size=3)
    fresh.set_state(state)
    for want, got in zip(expected, [next(fresh) for _ in range(4)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    fresh.close()


def test_state_of_another_objective_is_refused(kjv_tokenizer):
    state = make_pipeline(_cfg("span"), kjv_tokenizer, batch_size=2).get_state()
    with pytest.raises(JaxllmError, match="saved with objective=span, but this run has objective=mlm"):
        make_pipeline(_cfg("mlm"), kjv_tokenizer, batch_size=2).set_state(state)


@pytest.mark.parametrize("name", ["mlm", "span"])
def test_masks_change_every_epoch(tmp_path, name):
    # One document of 40 letters. mlm: it fills one row exactly (1 + 40 + 1 tokens), so every row is the
    # same text. span: 6 noise tokens in 2 spans (one span would always be the last tokens, as in T5).
    write_jsonl(tmp_path / "one.jsonl", ["abcdefghijklmnopqrstuvwxyzabcdefghijklmn"])
    seq_len = 42 if name == "mlm" else 48
    cfg = _cfg(name, str(tmp_path / "one.jsonl"), seq_len=seq_len)
    pipeline = make_pipeline(cfg, CharTokenizer(), batch_size=1)
    rows = [next(pipeline) for _ in range(12)]
    field = "inputs" if name == "mlm" else "encoder_inputs"
    if name == "mlm":
        assert all((row["targets"] == rows[0]["targets"]).all() for row in rows)  # the same text...
    assert len({row[field].tobytes() for row in rows}) > 4  # ...corrupted anew in every epoch
    again = make_pipeline(cfg, CharTokenizer(), batch_size=1)
    assert all((next(again)[field] == row[field]).all() for row in rows)  # and reproducibly


def test_finite_epoch_pads_the_last_batch(kjv_tokenizer):
    batches = list(make_pipeline(_cfg("span"), kjv_tokenizer, batch_size=5, num_epochs=1))
    assert all(b["encoder_inputs"].shape[0] == 5 for b in batches)
    # kjv-valid's last examples fill 3 rows; the other 2 are padding (segment 0, no loss).
    last = batches[-1]
    np.testing.assert_array_equal(last["encoder_segment_ids"].max(axis=1), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(last["decoder_loss_mask"][3:], 0)


# ---------------------------------------------------------------------------------- special ids


def test_special_ids_above_the_vocabulary(kjv_tokenizer):
    v = kjv_tokenizer.vocab_size  # 4096, no mask or sentinel pieces
    assert extra_token_count(_cfg("clm"), kjv_tokenizer) == 0
    assert special_ids(_cfg("mlm"), kjv_tokenizer).mask == v
    assert extra_token_count(_cfg("mlm"), kjv_tokenizer) == 1
    span = special_ids(_cfg("span", seq_len=512), kjv_tokenizer)
    # 28 sentinels for T5's 568-token chunks, from vocab + 1 (vocab itself is the mask's place).
    assert (span.sentinels[0], span.sentinels[-1], len(span.sentinels)) == (v + 1, v + 28, 28)
    assert (span.mask, span.decoder_start, span.vocab_size) == (None, 0, v + 29)
    bart = special_ids(_cfg("bart"), kjv_tokenizer)
    assert (bart.mask, bart.decoder_start, bart.vocab_size) == (v, kjv_tokenizer.eos_id, v + 1)
    ul2 = special_ids(_cfg("ul2"), kjv_tokenizer)
    s = len(ul2.sentinels)
    assert ul2.modes == {"[R]": v + 1 + s, "[X]": v + 2 + s, "[S]": v + 3 + s}  # mode tokens after the sentinels
    assert extra_token_count(_cfg("ul2"), kjv_tokenizer) == s + 4


class _OwnSpecials(CharTokenizer):
    """A tokenizer that has a mask token, two T5 sentinels and a UL2 mode token of its own."""

    vocab_size = 1000
    own = {"<mask>": 5, "<extra_id_0>": 999, "<extra_id_1>": 998, "[S]": 6}

    def token_to_id(self, token):
        return self.own.get(token)


def test_the_tokenizers_own_special_tokens_come_first():
    tok = _OwnSpecials()
    assert special_ids(_cfg("mlm"), tok).mask == 5 and extra_token_count(_cfg("mlm"), tok) == 0
    ul2 = _cfg("ul2", seq_len=8, objective={"denoisers": [{"kind": "prefix_lm", "mode_token": "[S]"}]})
    assert special_ids(ul2, tok).modes == {"[S]": 6}
    # T5's convention: sentinel i is <extra_id_i>; two suffice for a short span objective...
    short = _cfg("span", seq_len=12)
    assert encoder_decoder_lengths(short).spans == 1 and special_ids(short, tok).sentinels == (999,)
    # ...but not for a long one, and the error says what to change.
    with pytest.raises(JaxllmError, match="has only 2 sentinel tokens <extra_id_N>, but the span objective needs 28 at data.seq_len=512"):
        special_ids(_cfg("span", seq_len=512), tok)


def test_vocab_size_check_names_the_fix(kjv_tokenizer):
    cfg = _cfg("span", seq_len=512)
    check_vocab_size(4125, cfg, kjv_tokenizer)  # 4096 + 1 + 28
    message = (
        r"model.vocab_size=4096 is too small: the tokenizer has 4096 ids \+ 29 ids of the span objective "
        r"\(mask, sentinels, mode tokens\), 4125 in all; set model.vocab_size >= 4125 \(e.g. 4224"
    )
    with pytest.raises(ConfigError, match=message):
        check_vocab_size(4096, cfg, kjv_tokenizer)


def test_random_replacements_are_ordinary_tokens(kjv_tokenizer):
    cfg = _cfg("mlm", seq_len=256, objective={"mask_token_prob": 0.0, "random_token_prob": 1.0})
    pipeline = make_pipeline(cfg, kjv_tokenizer, batch_size=8)
    batch = next(pipeline)
    pipeline.close()
    replaced = batch["inputs"][batch["loss_mask"] == 1]
    assert len(replaced) > 200 and not np.isin(replaced, [0, 1, 2, 3, 4096]).any()


# -------------------------------------------------------------------------------------- config


def test_objective_config_round_trips_and_validates():
    cfg = load_config(None, ["data.objective.name=ul2", "data.objective.denoisers.0.kind=prefix_lm"])
    assert config_from_yaml_text(dump_yaml(cfg)).data.objective == cfg.data.objective
    with pytest.raises(ConfigError, match=r"data.objective.mask_token_prob \+ random_token_prob = 1.5 is more than 1"):
        load_config(None, ["data.objective.mask_token_prob=0.9", "data.objective.random_token_prob=0.6"])
    with pytest.raises(ConfigError, match=r"data.objective.denoisers.0.noise_density must be in \(0, 1\)"):
        load_config(None, ["data.objective.denoisers.0.noise_density=1.5"])
    with pytest.raises(ConfigError, match="data.objective.name must be one of clm, mlm, span, bart, ul2"):
        load_config(None, ["data.objective.name=t5"])
    with pytest.raises(ConfigError, match="data.objective.encoder_len=4096 must be between 1 and model.max_seq_len"):
        load_config(None, ["data.objective.encoder_len=4096"])


def test_rows_too_short_for_the_objective_are_a_clear_error():
    with pytest.raises(JaxllmError, match="the span objective cannot fit even one token of text in its rows"):
        encoder_decoder_lengths(DataConfig(seq_len=1, objective=ObjectiveConfig(name="span")))
