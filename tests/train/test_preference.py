"""Preference optimisation on the Trainer: the paired / KTO rows (data/preference.py), the reference's three
sources (a frozen model, LoRA adapters off, precomputed log-probs), DPO's ln 2 at the start, TRL's metrics."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jaxllm.config import DataConfig, JaxllmError, ObjectiveConfig, SourceConfig
from jaxllm.data.chat import ChatEncoder
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.preference import EncodePair, EncodeUnpaired, fit, implicit_prompt
from jaxllm.data.readers import RecordError
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.train.loop import Trainer
from jaxllm.train.losses import pair_sums, segment_sums
from jaxllm.train.metrics import read_metrics
from jaxllm.train.preference import reference_pairs
from tests.train.test_loop import micro_config

PAIRS = [
    {"prompt": "In the beginning", "chosen": " God created the heaven and the earth.", "rejected": " the earth."},
    {"prompt": "And God said,", "chosen": " Let there be light.", "rejected": " light be there let."},
    {"chosen": "And God saw the light, that it was good.", "rejected": "And God saw the darkness."},  # implicit prompt
]


def _tokenizer():
    return load_tokenizer("builtin:kjv-sp4k")


def _data(path, name="dpo", seq_len=64, **objective):
    return DataConfig(sources=[SourceConfig(path=str(path))], seq_len=seq_len, shuffle_window=0, prefetch=0,
                      objective=ObjectiveConfig(name=name, **objective))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_implicit_prompt_is_the_shared_beginning():
    assert implicit_prompt("And God saw the light", "And God saw the dark") == ("And God saw the", " light", " dark")
    a = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}]
    b = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]
    assert implicit_prompt(a, b) == ([a[0]], [a[1]], [b[1]])


def test_fit_cuts_the_longest_sequences_first():
    assert fit([10, 100], 64) == [10, 54]
    assert fit([100, 100], 64) == [32, 32]
    assert fit([5, 6], 64) == [5, 6]
    assert sum(fit([7, 30, 41, 3], 50)) <= 50 and fit([7, 30, 41, 3], 50)[0] == 7


def test_pair_rows_hold_both_sequences_unshifted_with_the_response_masked(tmp_path):
    tok = _tokenizer()
    cfg = _data(_write(tmp_path / "pairs.jsonl", PAIRS))
    batch = next(make_pipeline(cfg, tok, 4, 0, 1, num_epochs=1))
    encoder = ChatEncoder(tok, None, bos_id=tok.bos_id)
    seqs = []
    for r in PAIRS:
        prompt, chosen, rejected = (r["prompt"], r["chosen"], r["rejected"]) if "prompt" in r else \
            implicit_prompt(r["chosen"], r["rejected"])
        seqs += [encoder.encode({"prompt": prompt, "completion": chosen}),
                 encoder.encode({"prompt": prompt, "completion": rejected})]
    found = []
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            at = seg == s
            ids = batch["inputs"][row][at]
            np.testing.assert_array_equal(batch["positions"][row][at], np.arange(at.sum()))
            np.testing.assert_array_equal(batch["targets"][row][at][:-1], ids[1:])  # next token within the segment
            assert batch["loss_mask"][row][at][-1] == 0  # nothing after a sequence's last token
            found.append((s, ids.tolist(), batch["loss_mask"][row][at].tolist()))
    assert len(found) == 6 and [s % 2 for s, _, _ in found] == [1, 0] * 3  # chosen odd, rejected even, pairs whole
    for (_, ids, mask), (want_ids, want_mask) in zip(found, seqs):
        assert ids == want_ids and ids[-1] == tok.eos_id  # the whole sequence, EOS last
        assert mask == want_mask[1:] + [0]  # the loss mask is on the *targets* that are response tokens


def test_kto_units_pair_each_prompt_with_another_completion(tmp_path):
    tok = _tokenizer()
    rows = [{"prompt": "In the beginning", "completion": " God created.", "label": True},
            {"prompt": "And God said,", "completion": " darkness light.", "label": False}]
    batch = next(make_pipeline(_data(_write(tmp_path / "kto.jsonl", rows), "kto"), tok, 2, 0, 1, num_epochs=1))
    seg, inputs = batch["segment_ids"][0], batch["inputs"][0]
    text = [tok.decode(inputs[seg == s].tolist()) for s in range(1, 5)]
    assert text == ["In the beginning God created.", "In the beginning darkness light.",
                    "And God said, darkness light.", "And God said, God created."]
    labels = [batch["kto_label"][0][seg == s] for s in range(1, 5)]
    assert [set(v.tolist()) for v in labels] == [{1.0}, {1.0}, {0.0}, {0.0}]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "b"}, "no field 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}, "both be strings or both"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1.0}, "must both be finite numbers"),
])
def test_bad_pair_records_are_one_line_errors(record, message):
    cfg = _data("x.jsonl")
    with pytest.raises(RecordError, match=message):
        EncodePair(cfg, _tokenizer(), cfg.sources[0])(record)


def test_a_kto_label_must_be_a_boolean():
    cfg = _data("x.jsonl", "kto")
    with pytest.raises(RecordError, match="'label' must be true"):
        EncodeUnpaired(cfg, _tokenizer(), cfg.sources[0])({"prompt": "a", "completion": "b", "label": "yes"})


def test_segment_and_pair_sums():
    seg = np.array([[1, 1, 2, 2, 2, 3, 4, 0]])
    values = np.arange(8, dtype=np.float32)[None]
    np.testing.assert_array_equal(segment_sums(seg, values)[0, :5], [7, 1, 9, 5, 6])
    chosen, rejected = pair_sums(seg, values)
    np.testing.assert_array_equal(chosen[0, :2], [1, 5])
    np.testing.assert_array_equal(rejected[0, :2], [9, 6])


# ------------------------------------------------------------------------------------------ training

MICRO_PREF = ["model.max_seq_len=64", "data.seq_len=64", "data.prefetch=0", "train.batch_size=8", "optim.lr=3e-3",
              "optim.warmup_steps=0", "checkpoint.every=100", "data.shuffle_window=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 4-step clm run: the policy's start and the reference."""
    run_dir = tmp_path_factory.mktemp("base")
    trainer = Trainer(micro_config(run_dir, "train.steps=4", *MICRO_PREF))
    try:
        trainer.run()
    finally:
        trainer.close()
    return run_dir


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS * 6)


def _pref_config(run_dir, base_run, pairs_file, *extra):
    return micro_config(run_dir, f"train.init_from={base_run}", f"data.sources=[{{path: {pairs_file}}}]",
                        "data.objective.name=dpo", "train.steps=3", *MICRO_PREF, *extra)


def test_dpo_starts_at_ln2_and_logs_trl_metrics(base_run, pairs_file, tmp_path):
    cfg = _pref_config(tmp_path / "dpo", base_run, pairs_file, f"eval.sources=[{{path: {pairs_file}}}]",
                       "eval.every=3")
    trainer = Trainer(cfg)
    try:
        assert set(trainer.frozen) == {"reference"}
        start = trainer.evaluate()
        first = jax.device_get(trainer.train_step(trainer.next_batch()))
        # The reference is the policy at the first step: every log-ratio is 0 and the loss exactly ln 2.
        assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert float(first[name]) == pytest.approx(0.0, abs=1e-6)
        assert float(first["logps/chosen"]) < 0 and float(first["logps/rejected"]) < 0
        trainer.run()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "dpo")
    end = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in end] == [3]
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-5) and "eval_ppl" not in start
    assert start["eval_rewards/accuracies"] == 0  # no reward above another: all are 0
    assert end[0]["eval_loss"] < start["eval_loss"]  # 3 steps on the same 3 pairs: the margin grows
    assert end[0]["eval_rewards/accuracies"] > 0.5 and end[0]["eval_rewards/margins"] > 0


def test_lora_reference_is_the_base_with_adapters_off(base_run, pairs_file, tmp_path):
    cfg = _pref_config(tmp_path / "lora", base_run, pairs_file, "model.lora.rank=4", "model.lora.alpha=8")
    trainer = Trainer(cfg)
    try:
        assert trainer.frozen == {}  # no second copy of the weights
        for _ in range(2):
            out = jax.device_get(trainer.train_step(trainer.next_batch()))
        assert abs(float(out["rewards/margins"])) > 0  # the adapters moved the policy away from the reference
        batch = trainer.next_batch()
        adapters_off = reference_pairs(trainer.state.params, trainer.graphdef, batch, {}, trainer.cfg)
        base = Trainer(dataclasses.replace(trainer.cfg, model=dataclasses.replace(trainer.cfg.model, lora=None),
                                           run_dir=str(tmp_path / "plain")))
        try:
            frozen = reference_pairs(None, None, batch, base.frozen, base.cfg)
        finally:
            base.close()
        for a, b in zip(adapters_off, frozen):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    finally:
        trainer.close()


def test_precomputed_reference_log_probs_equal_the_frozen_reference(base_run, pairs_file, tmp_path):
    from jaxllm.train.ref_logps import precompute

    cfg = _pref_config(tmp_path / "pre", base_run, pairs_file)
    out = tmp_path / "with_ref.jsonl"
    assert precompute(cfg, out, batch_size=3) == {"written": len(PAIRS) * 6, "skipped": 0}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in records)
    frozen_cfg = _pref_config(tmp_path / "frozen", base_run, out)
    trainer = Trainer(frozen_cfg)
    try:
        batch = trainer.next_batch()
        want = reference_pairs(None, None, batch, trainer.frozen, trainer.cfg)
    finally:
        trainer.close()
    trainer = Trainer(_pref_config(tmp_path / "pre", base_run, out, "data.objective.precomputed_reference=true"))
    try:
        assert trainer.frozen == {}  # no reference model loaded
        batch = trainer.next_batch()
        got = reference_pairs(None, None, batch, {}, trainer.cfg)
        first = jax.device_get(trainer.train_step(batch))
    finally:
        trainer.close()
    valid = np.asarray(want[0]) != 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=1e-5)
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-5)


def test_a_reference_is_required(pairs_file, tmp_path):
    cfg = micro_config(tmp_path / "x", f"data.sources=[{{path: {pairs_file}}}]", "data.objective.name=dpo",
                       *MICRO_PREF)
    with pytest.raises(JaxllmError, match="needs a reference model"):
        Trainer(cfg)


def test_kto_trains(base_run, tmp_path):
    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in PAIRS[:2]
            for k in ("chosen", "rejected")]
    path = _write(tmp_path / "kto.jsonl", rows * 4)
    cfg = micro_config(tmp_path / "kto", f"train.init_from={base_run}", f"data.sources=[{{path: {path}}}]",
                       "data.objective.name=kto", "train.steps=3", *MICRO_PREF)
    trainer = Trainer(cfg)
    try:
        first = jax.device_get(trainer.train_step(trainer.next_batch()))
        # policy == reference: every log-ratio and the KL estimate are 0, each loss 1 - sigmoid(0) = 0.5
        assert float(first["loss"]) == pytest.approx(0.5, abs=1e-6)
        assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["losses"][3] < 0.5


def test_preview_shows_each_pairs_two_sequences_with_the_responses_marked(capsys):
    from jaxllm.cli import main

    assert main(["data", "preview", "configs/tiny-dpo.yaml", "-n", "1", "train.init_from=null"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  [")]
    assert [line[:5] for line in lines[:2]] == ["  [1]", "  [2]"]
    prompts = [line.split("⟦")[0][6:] for line in lines[:2]]
    assert prompts[0] == prompts[1] and prompts[0].endswith("<|assistant|>\\n")  # one prompt, two responses
    assert all(line.count("⟦") == 1 and line.endswith("</s>⟧\\n") for line in lines[:2])


@pytest.mark.parametrize("name, extra", [("orpo", []), ("simpo", ["preference.beta=2.0", "preference.cpo_alpha=0.5"])])
def test_reference_free_methods_train_without_a_reference(name, extra, base_run, pairs_file, tmp_path):
    cfg = micro_config(tmp_path / name, f"train.init_from={base_run}", f"data.sources=[{{path: {pairs_file}}}]",
                       f"data.objective.name={name}", "train.steps=4", *MICRO_PREF, *extra)
    trainer = Trainer(cfg)
    try:
        assert trainer.frozen == {}
        summary = trainer.run()
    finally:
        trainer.close()
    rows = [r for r in read_metrics(tmp_path / name) if "loss" in r]
    assert summary["losses"][4] < summary["losses"][1]
    assert rows[-1]["nll_loss"] > 0 and "rewards/accuracies" in rows[-1] and "logps/accuracies" in rows[-1]


@pytest.mark.parametrize("overrides, message", [
    (["data.objective.name=kto", "data.objective.precomputed_reference=true"], "precomputed_reference is for dpo"),
    (["data.objective.name=orpo", "data.objective.precomputed_reference=true"], "uses no reference: drop it"),
    (["data.objective.name=dpo", "preference.beta=0"], "preference.beta must be > 0"),
    (["data.objective.name=dpo", "preference.loss_type=robust", "preference.label_smoothing=0.5"],
     r"label_smoothing must be in \[0, 0.5\) for loss_type=robust"),
    (["data.objective.name=dpo", "preference.loss_type=exo_pair"], r"EXO's epsilon\) must be in \(0, 1\)"),
    (["data.objective.name=kto", "preference.desirable_weight=0", "preference.undesirable_weight=0"],
     "KTO would learn nothing"),
])
def test_bad_preference_configs_are_one_line_errors(overrides, message, tmp_path):
    from jaxllm.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        micro_config(tmp_path, *overrides)


def test_ref_logps_needs_one_dpo_source(pairs_file, tmp_path):
    from jaxllm.train.ref_logps import precompute

    two = micro_config(tmp_path, "data.objective.name=dpo",
                       f"data.sources=[{{path: {pairs_file}}}, {{path: {pairs_file}}}]")
    with pytest.raises(JaxllmError, match="reads one source, the config has 2"):
        precompute(two, tmp_path / "out.jsonl")
    with pytest.raises(JaxllmError, match="precomputes a DPO reference; data.objective.name is kto"):
        precompute(micro_config(tmp_path, "data.objective.name=kto"), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
