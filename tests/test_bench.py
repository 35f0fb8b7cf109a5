"""The benchmark harness: the FLOPs formula by hand (dense and mixture of experts), and one short
`jaxllm bench` run with the step-time breakdown and a profiler trace. Speed itself is never asserted."""

import dataclasses
import json

import numpy as np
import pytest

from jaxllm import bench, bench_batches, bench_trl, models
from jaxllm.cli import main
from jaxllm.config import load_config

TINY = "configs/tiny.yaml"


def test_flops_per_token_is_six_n_plus_attention():
    m = load_config(TINY).model
    D, L, H, K, dh, F, V = m.d_model, m.num_layers, m.num_heads, m.kv_heads, m.dim_per_head, m.mlp_dim, m.vocab_size
    per_layer = D * H * dh + 2 * D * K * dh + H * dh * D + 3 * D * F + 2 * D  # q, k, v, o, SwiGLU, 2 norms
    n_matmul = L * per_layer + D + V * D  # final norm; the tied output projection (the lookup is not a matmul)
    assert m.tie_embeddings and bench.matmul_params(m) == n_matmul
    assert bench.flops_per_token(m, 128) == 6 * n_matmul + 12 * L * H * dh * 128
    # MaxText's and torchtitan's convention: a causal mask leaves half the scores
    assert bench.flops_per_token(m, 128, causal=True) == 6 * n_matmul + 6 * L * H * dh * 128


def test_table_says_which_way_the_ratio_goes_and_both_mfus():
    row = {"step_time_median": 0.1, "step_time_p90": 0.2}
    table = bench.format_table({"jaxllm": {**row, "tokens_per_sec": 300.0, "mfu": 0.5, "mfu_causal": 0.4},
                                "transformers (eager)": {**row, "tokens_per_sec": 100.0}}).splitlines()
    header, _, peer = (line.split("  ") for line in table)
    column = [c.strip() for c in header if c.strip()].index("jaxllm is x faster")
    assert [c.strip() for c in peer if c.strip()][column] == "3.00x"  # 300 / 100: jaxllm three times faster
    assert "MFU PaLM / causal" in table[0] and "50.0% / 40.0%" in table[1]


def test_mixture_of_experts_counts_the_experts_a_token_visits():
    moe = load_config("configs/tiny-moe.yaml").model  # 8 experts of 256, 2 per token
    dense = dataclasses.replace(moe, moe=None, mlp_dim=2 * moe.moe.expert_mlp_dim)
    router = moe.num_layers * moe.d_model * moe.moe.num_experts
    assert bench.matmul_params(moe) == bench.matmul_params(dense) + router
    assert models.param_counts(moe)["total"] > 3 * models.param_counts(dense)["total"] / 2


def test_bench_cli_reports_throughput_breakdown_and_profile(tmp_path, capsys, monkeypatch):
    from jaxllm.train import step

    calls = []

    def counted(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    counted(models, "init_params")
    counted(step, "jit_train_step")
    out = tmp_path / "bench.json"
    code = main(["bench", TINY, "model.num_layers=2", "train.batch_size=8", "--peer", "none",
                 "--steps", "2", "--warmup", "1", "--breakdown", "--profile", str(tmp_path / "trace"),
                 "--out", str(out), "data.seq_len=64"])  # an override after the options counts too
    assert code == 0
    assert calls == ["init_params", "jit_train_step"]  # throughput, breakdown and profile share one setup
    results = json.loads(out.read_text())
    ours = results["jaxllm"]
    assert ours["tokens_per_sec"] > 0 and 0 < ours["mfu"] < 1 and ours["tokens_per_step"] == 8 * 64
    assert 0 < ours["mfu_causal"] < ours["mfu"] and ours["params"]["total"] > ours["params"]["non_embedding"]
    parts = results["step breakdown"]["seconds"]
    assert all(parts[k] > 0 for k in ("forward", "backward", "optimizer update"))
    whole = parts["forward"] + parts["backward"] + parts["optimizer update"] + parts["other"]
    assert abs(whole - results["step breakdown"]["step_s"]) < 1e-9
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no profiler trace written"
    printed = capsys.readouterr().out
    assert "parts timed alone" in printed and "profile:" in printed


def test_the_sft_batch_packs_examples_with_the_loss_on_their_completions():
    from jaxllm.bench_trl import _records

    cfg = load_config(TINY, ["data.seq_len=64", "train.batch_size=3"])
    examples = bench_batches.synthetic_examples(cfg.model.vocab_size, 3, 64, segments=4)
    batch = bench_batches.objective_batch(cfg, 3, packed=True, segments=4)
    assert {k: v.shape for k, v in batch.items()} == {k: (3, 64) for k in
                                                      ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for r, row in enumerate(examples):
        assert sum(len(tokens) - 1 for tokens, _ in row) == 64 and len(row) == 4  # the examples fill the row
        segment, start = batch["segment_ids"][r], 0
        for s, (tokens, prompt) in enumerate(row, start=1):
            n = len(tokens) - 1
            assert (segment[start:start + n] == s).all()
            assert list(batch["positions"][r, start:start + n]) == list(range(n))
            np.testing.assert_array_equal(batch["inputs"][r, start:start + n], tokens[:-1])
            np.testing.assert_array_equal(batch["targets"][r, start:start + n], tokens[1:])
            # the loss on the targets that are completion tokens: tokens prompt .. n, at positions prompt - 1 ..
            assert list(batch["loss_mask"][r, start:start + n]) == [0.0] * (prompt - 1) + [1.0] * (n - prompt + 1)
            start += n
    assert 0.3 < batch["loss_mask"].mean() < 0.8
    # TRL is given the same examples: jaxllm's inputs, the completion masked in (TRL shifts the labels itself)
    records = _records(cfg, 1, 4)
    assert [r["input_ids"] for r in records] == [tokens[:-1].tolist() for row in examples for tokens, _ in row]
    assert [r["completion_mask"].index(1) for r in records] == [prompt for row in examples for _, prompt in row]


def test_every_objective_gets_a_synthetic_batch_of_its_spec():
    from jaxllm.data.objectives import batch_spec

    for config in ("configs/tiny-t5-span.yaml", "configs/tiny-bert-mlm.yaml", TINY):
        cfg = load_config(config)
        spec, batch = batch_spec(cfg.data, 2), bench_batches.objective_batch(cfg, 2)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
        assert (batch.get("segment_ids", batch.get("decoder_segment_ids")) == 1).all()  # one document per row


def _distill_to_teacher(params, graphdef, batch, norms, key, frozen, cfg):
    """The shape of a distillation loss: clm + token-mean KL(teacher || student) on the loss mask."""
    import jax
    import jax.numpy as jnp

    from jaxllm.train.losses import pretraining_loss

    objective, metrics = pretraining_loss(params, graphdef, batch, norms, cfg.train.z_loss, key, 0)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    student = jax.nn.log_softmax(models.bind(graphdef, params)(*args)[0])
    teacher = jax.nn.log_softmax(frozen["teacher"].bind()(*args)[0].astype(jnp.float32))
    kl = jnp.sum(jnp.sum(jnp.exp(teacher) * (teacher - student), -1) * batch["loss_mask"]) / norms["tokens"]
    return objective + kl, dict(metrics, kl=kl)


@pytest.fixture
def distill_objective(tmp_path, monkeypatch):
    """A method with a teacher (a Hugging Face directory twice the student's depth): what `distill` will be."""
    from jaxllm.config import ObjectiveConfig
    from jaxllm.convert.hf import save_hf
    from jaxllm.data import objectives
    from jaxllm.train import objective
    from jaxllm.train.frozen import FrozenSource
    from tests.conftest import random_params

    teacher = dataclasses.replace(load_config(TINY, STUDENT).model, num_layers=2)
    save_hf(random_params(teacher), teacher, tmp_path / "teacher")
    monkeypatch.setitem(ObjectiveConfig.__annotations__, "name",
                        ObjectiveConfig.__annotations__["name"].replace("'ul2'", "'ul2', 'test_distill'"))
    monkeypatch.setitem(objective._OBJECTIVES, "test_distill", objective.Objective(
        "test_distill", ("decoder",), _distill_to_teacher,
        frozen_models=lambda cfg: {"teacher": FrozenSource(str(tmp_path / "teacher"), "bfloat16")}))
    monkeypatch.setitem(objectives._FORMATS, "test_distill", objectives.batch_format("clm"))
    return teacher


STUDENT = ["model.num_layers=1", "model.d_model=64", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=128",
           "train.batch_size=8", "data.seq_len=16"]


def test_bench_against_trl_sft_and_distillation_next_to_pretraining(distill_objective, tmp_path, capsys):
    out = tmp_path / "trl.json"
    code = main(["bench", TINY, *STUDENT, "data.objective.name=test_distill", "--peer", "trl", "--steps", "1",
                 "--warmup", "1", "--segments", "2", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    rows = ["jaxllm pretraining (clm)", "jaxllm sft", "jaxllm test_distill", "TRL SFTTrainer (bfd)",
            "TRL GKDTrainer (lmbda=0)"]
    assert [k for k in results if isinstance(results[k], dict)] == rows
    for name in rows:
        r = results[name]
        assert r["tokens_per_sec"] > 0 and r["step_time_median"] > 0 and r["mfu"] > 0
        assert r["peak_memory_bytes"]["peak_bytes_in_use"] > 0 and r["tokens_per_step"] > 0
    ours = {name: results[name] for name in rows[:3]}
    # one MFU denominator for every row of a run (a CPU's peak is measured once, not per row)
    assert len({r["peak_flops_per_device"] for r in ours.values()}) == 1
    assert {r["tokens_per_step"] for r in ours.values()} == {8 * 16}
    # TRL's packing may leave room in a row: its tokens are counted as collated (padding-free: no padding)
    assert results["TRL SFTTrainer (bfd)"]["tokens_per_step"] <= 8 * 16
    assert [r["objective"] for r in ours.values()] == ["clm", "sft", "test_distill"]
    # pretraining learns every token; SFT and distillation the completions of the packed examples
    assert ours["jaxllm pretraining (clm)"]["loss_tokens_per_step"] == 8 * 16
    sft_loss_tokens = ours["jaxllm sft"]["loss_tokens_per_step"]
    assert 0 < sft_loss_tokens == ours["jaxllm test_distill"]["loss_tokens_per_step"] < 8 * 16
    # a distillation step's FLOPs add the teacher's forward: a third of its forward + backward count
    student, teacher = load_config(TINY, STUDENT).model, distill_objective
    assert ours["jaxllm test_distill"]["flops_per_token"] == pytest.approx(
        bench.flops_per_token(student, 16) + bench.flops_per_token(teacher, 16) / 3)
    assert ours["jaxllm test_distill"]["frozen_params"] == {"teacher": models.param_counts(teacher)["total"]}
    assert results["TRL SFTTrainer (bfd)"]["compare_to"] == "jaxllm sft"
    assert results["TRL GKDTrainer (lmbda=0)"]["compare_to"] == "jaxllm test_distill"
    assert results["TRL GKDTrainer (lmbda=0)"]["beta"] == 0.5 and results["TRL SFTTrainer (bfd)"]["packing"] == "bfd"
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows) and "x (jaxllm test_distill)" in printed


def test_bad_post_training_bench_requests_are_one_line_errors_before_any_peer_runs(tmp_path, capsys, monkeypatch):
    from jaxllm.config import ObjectiveConfig
    from jaxllm.data import objectives
    from jaxllm.train import objective
    from jaxllm.train.frozen import FrozenSource

    monkeypatch.setattr(bench_trl, "bench_trl_sft", lambda *a, **k: pytest.fail("a peer ran"))
    assert main(["bench", TINY, "--peer", "trl", "--breakdown"]) == 2
    assert main(["bench", TINY, "--peer", "trl", "--segments", "65", "data.seq_len=128"]) == 2
    # a DPO row holds pairs: two sequences, each a prompt and a response token
    assert main(["bench", "configs/tiny-dpo.yaml", "--peer", "trl", "--segments", "9", "data.seq_len=32"]) == 2
    monkeypatch.setitem(ObjectiveConfig.__annotations__, "name",
                        ObjectiveConfig.__annotations__["name"].replace("'ul2'", "'ul2', 'test_distill'"))
    monkeypatch.setitem(objective._OBJECTIVES, "test_distill", objective.Objective(
        "test_distill", ("decoder",), _distill_to_teacher,
        frozen_models=lambda cfg: {"teacher": FrozenSource(str(tmp_path / "no-teacher"))}))
    monkeypatch.setitem(objectives._FORMATS, "test_distill", objectives.batch_format("clm"))
    assert main(["bench", TINY, "--peer", "trl", "data.objective.name=test_distill"]) == 2
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    assert main(["bench", TINY, "--peer", "trl"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        ("error: --breakdown, --profile, --data and --generate measure the config's own step: run them without "
         "--peer trl"),
        ("error: --segments 65: rows of data.seq_len=128 tokens hold 1 to 64 examples (at least 2 tokens each); "
         "choose a count in that range"),
        ("error: --segments 9: rows of data.seq_len=32 tokens hold 1 to 8 pairs (at least 4 tokens each); "
         "choose a count in that range"),
        (f"error: the frozen model {tmp_path / 'no-teacher'} does not exist: train or convert it first, or point "
         "the config at one"),
        ("error: --peer trl runs TRL's trainers, which need trl: pip install -e '.[test]' (trl==1.16.0, torch, "
         "transformers, datasets)"),
    ]


def test_the_dpo_batch_is_the_preference_pipelines_rows_and_trls_pairs():
    """The synthetic DPO batch equals the rows jaxllm/data/preference.py packs from the same pairs, and TRL's
    collator gets the same sequences with its completion mask on the same targets."""
    import grain
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from jaxllm.bench_trl import _pair_records
    from jaxllm.data import preference

    cfg = load_config("configs/tiny-dpo.yaml", [*STUDENT, "train.batch_size=3", "data.seq_len=64"])
    pairs = bench_batches.synthetic_pairs(cfg.model.vocab_size, 3, 64, segments=4)
    batch = bench_batches.objective_batch(cfg, 3, segments=4)
    assert {k: v.shape for k, v in batch.items()} == {k: (3, 64) for k in
                                                      ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for row in pairs:  # 4 pairs fill each row exactly, every sequence with a prompt and a response token
        assert len(row) == 4 and sum(2 * len(p) + len(c) + len(r) for p, c, r in row) == 64
        assert all(len(p) >= 1 and len(c) >= 1 and len(r) >= 1 for p, c, r in row)
    assert list(np.unique(batch["segment_ids"])) == list(range(1, 9))  # no padding: 8 sequences per row
    units = [{"sequences": [(np.concatenate([p, x]).tolist(), [0] * len(p) + [1] * len(x)) for x in (c, r)]}
             for row in pairs for p, c, r in row]
    docs = grain.MapDataset.source(units).to_iter_dataset()
    rows = list(preference._rows(docs, cfg.data, None, 3, 0))
    assert len(rows) == 3
    for r, row in enumerate(rows):
        for key, value in row.items():
            np.testing.assert_array_equal(batch[key][r], value, err_msg=f"row {r}, {key}")
    # TRL: prompt + chosen then prompt + rejected of every pair, the loss on the response's targets
    records = _pair_records(cfg, 1, 4)
    collated = DataCollatorForPreference(pad_token_id=0, max_length=64)(records)
    mask, n = collated["attention_mask"], len(records)
    assert int(mask.sum()) == 3 * 64 and n == 12  # all real tokens of both sequences of every pair
    for k in range(n):
        for side, i in ((0, k), (1, n + k)):
            r, segment = divmod(k, 4)
            in_row = batch["segment_ids"][r] == 2 * segment + 1 + side
            length = int(mask[i].sum())
            np.testing.assert_array_equal(collated["input_ids"][i, :length].numpy(), batch["inputs"][r][in_row])
            # TRL's loss on token t + 1 where completion_mask[t + 1]; jaxllm's on target t where loss_mask[t]
            np.testing.assert_array_equal(collated["completion_mask"][i, 1:length].numpy(),
                                          batch["loss_mask"][r][in_row][:-1])


@pytest.fixture
def sft_start(tmp_path):
    """A starting model (a Hugging Face directory of the student's shapes) for a DPO config's train.init_from."""
    from jaxllm.convert.hf import save_hf
    from tests.conftest import random_params

    model = load_config(TINY, STUDENT).model
    save_hf(random_params(model), model, tmp_path / "sft")
    return tmp_path / "sft", model


def test_bench_dpo_against_trl_dpo_trainer_computes_the_same_first_loss(sft_start, tmp_path, capsys):
    """`jaxllm bench configs/tiny-dpo.yaml --peer trl`: the dpo row and TRL's DPOTrainer on the same pairs, each
    reference a copy of its policy, so both first losses are ln 2 (the same computation), on the same tokens."""
    start, model = sft_start
    out = tmp_path / "dpo.json"
    code = main(["bench", "configs/tiny-dpo.yaml", f"train.init_from={start}", "train.batch_size=8",
                 "data.seq_len=16", "--peer", "trl", "--steps", "1", "--warmup", "1", "--segments", "2",
                 "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    rows = ["jaxllm pretraining (clm)", "jaxllm sft", "jaxllm dpo", "TRL SFTTrainer (bfd)", "TRL DPOTrainer"]
    assert [k for k in results if isinstance(results[k], dict)] == rows
    ours, theirs = results["jaxllm dpo"], results["TRL DPOTrainer"]
    assert ours["params"]["total"] == models.param_counts(model)["total"]  # the shapes of train.init_from's model
    assert ours["objective"] == "dpo" and theirs["compare_to"] == "jaxllm dpo" and theirs["pairs_per_step"] == 16
    assert ours["tokens_per_step"] == theirs["tokens_per_step"] == 8 * 16  # every token of both sequences
    assert ours["first_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert theirs["first_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert theirs["beta"] == 0.1 and theirs["loss_type"] == "sigmoid"
    # the policy's forward and backward, and the reference's forward (a third of it): 4/3 of an SFT step's
    assert ours["frozen_params"] == {"reference": ours["params"]["total"]}
    assert ours["flops_per_token"] == pytest.approx(4 / 3 * bench.flops_per_token(model, 16))
    assert theirs["flops_per_token"] == ours["flops_per_token"] and theirs["mfu"] > 0
    assert 0 < ours["loss_tokens_per_step"] < 8 * 16
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows) and "x (jaxllm dpo)" in printed
