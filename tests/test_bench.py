"""The benchmark harness: the FLOPs formula by hand (dense and mixture of experts), and one short
`jaxllm bench` run with the step-time breakdown and a profiler trace. Speed itself is never asserted."""

import dataclasses
import json

from jaxllm import bench, models
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
