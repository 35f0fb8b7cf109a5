"""The benchmark harness: the FLOPs formula by hand (dense and mixture of experts), and one short
`jaxllm bench` run with the step-time breakdown and a profiler trace. Speed itself is never asserted."""

import dataclasses
import json

from jaxllm import bench
from jaxllm.cli import main
from jaxllm.config import load_config

TINY = "configs/tiny.yaml"


def test_flops_per_token_is_six_n_plus_attention():
    m = load_config(TINY).model
    D, L, H, K, dh, F, V = m.d_model, m.num_layers, m.num_heads, m.kv_heads, m.dim_per_head, m.mlp_dim, m.vocab_size
    per_layer = D * H * dh + 2 * D * K * dh + H * dh * D + 3 * D * F + 2 * D  # q, k, v, o, SwiGLU, 2 norms
    n_matmul = L * per_layer + D + V * D  # final norm; the tied output projection (the lookup is not a matmul)
    assert m.tie_embeddings and bench.param_counts(m)["matmul"] == n_matmul
    assert bench.flops_per_token(m, 128) == 6 * n_matmul + 12 * L * H * dh * 128


def test_mixture_of_experts_counts_the_experts_a_token_visits():
    moe = load_config("configs/tiny-moe.yaml").model  # 8 experts of 256, 2 per token
    dense = dataclasses.replace(moe, moe=None, mlp_dim=2 * moe.moe.expert_mlp_dim)
    router = moe.num_layers * moe.d_model * moe.moe.num_experts
    assert bench.param_counts(moe)["matmul"] == bench.param_counts(dense)["matmul"] + router
    assert bench.param_counts(moe)["total"] > 3 * bench.param_counts(dense)["total"] / 2


def test_bench_cli_reports_throughput_breakdown_and_profile(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", TINY, "model.num_layers=2", "train.batch_size=8", "data.seq_len=64", "--peer", "none",
                 "--steps", "2", "--warmup", "1", "--breakdown", "--profile", str(tmp_path / "trace"),
                 "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    ours = results["jaxllm"]
    assert ours["tokens_per_sec"] > 0 and 0 < ours["mfu"] < 1 and ours["tokens_per_step"] == 8 * 64
    parts = results["step breakdown"]["seconds"]
    assert all(parts[k] > 0 for k in ("forward", "backward", "optimizer update"))
    whole = parts["forward"] + parts["backward"] + parts["optimizer update"] + parts["other"]
    assert abs(whole - results["step breakdown"]["step_s"]) < 1e-9
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no profiler trace written"
    printed = capsys.readouterr().out
    assert "parts timed alone" in printed and "profile:" in printed
