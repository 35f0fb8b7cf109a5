"""An analytical model of one train step on a TPU slice: FLOPs, memory per chip and step time.

It ranks many layouts in milliseconds; the compiler then checks the best of them (`plan.compile`).
FLOPs are exact matmul counts of our decoder (the compiler's own count visits a scanned layer once,
so it cannot be used for a whole step). Memory and time are first-order:

- state: float32 parameters, gradients and Adam moments, sharded over fsdp x tensor;
- activations of one micro-batch: what the remat policy keeps per layer, one layer's working set,
  the float32 logits of one loss chunk (`train.loss_chunk` positions), and the attention
  probabilities only where the XLA kernel materialises them (splash attention on TPUs keeps none);
- time: max(compute at peak, HBM traffic, fsdp/data collectives overlapped with compute)
  + tensor-parallel all-reduces (on the critical path) + the cross-slice gradient all-reduce.
  A collective over one mesh axis is taken to use half the chip's total ICI bandwidth.
"""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig
from jaxllm.plan.chips import Chip

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run the step: mesh sizes per slice, slices, remat policy and micro-batches."""

    data: int
    fsdp: int
    tensor: int
    remat: str
    grad_accum: int
    slices: int = 1

    def describe(self) -> str:
        dcn = f"{self.slices}x" if self.slices > 1 else ""
        return f"data={dcn}{self.data} fsdp={self.fsdp} tensor={self.tensor} remat={self.remat} accum={self.grad_accum}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    model_flops: float  # per step, all chips: matmuls forward + backward (what MFU counts)
    hardware_flops: float  # per step, all chips, with the forward recomputed by remat
    memory_bytes: float  # per chip
    step_seconds: float
    mfu: float
    parts: dict[str, float]  # seconds: compute, hbm, fsdp_data, tensor, dcn


def param_count(m: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters of the matmuls a token passes through, the output projection included)."""
    H, D, F = m.dim_per_head, m.d_model, m.mlp_dim
    attn = D * H * (m.num_heads * 2 + m.kv_heads * 2)
    mlp = D * F * (3 if m.mlp == "swiglu" else 2)
    norms = 2 * D
    per_layer = attn + mlp + norms
    embed = m.vocab_size * D
    head = 0 if m.tie_embeddings else embed
    total = m.num_layers * per_layer + embed + head + D + (m.max_seq_len * D if m.positions == "learned" else 0)
    matmul = m.num_layers * (attn + mlp) + embed
    return total, matmul


def step_flops(m: ModelConfig, tokens: int, seq_len: int, remat: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over `tokens` tokens (all chips together)."""
    _, matmul = param_count(m)
    # Scores and the weighted sum: 2 matmuls of L x L x heads*head_dim per layer, full (not causal-skipped).
    attn_fwd = 2 * 2 * m.num_layers * seq_len * m.num_heads * m.dim_per_head
    forward = 2 * matmul + attn_fwd
    model = 3 * forward * tokens
    recompute = {"none": 0.0, "dots": 0.0, "dots_with_no_batch_dims": attn_fwd / forward, "full": 1.0}[remat]
    return model, model + recompute * forward * tokens


def memory_per_chip(m: ModelConfig, layout: Layout, batch: int, seq_len: int, loss_chunk: int = 0) -> float:
    total, _ = param_count(m)
    shards = layout.fsdp * layout.tensor
    p_bytes = BYTES[m.param_dtype]
    state = total * (p_bytes + 8) / shards  # parameters + Adam's two float32 moments
    grads = total * 4 / shards
    a = BYTES[m.dtype]
    t = layout.tensor
    b = batch // layout.grad_accum // (layout.data * layout.fsdp * layout.slices)
    D, F, L, H = m.d_model, m.mlp_dim, seq_len, m.dim_per_head
    heads = m.num_heads / t
    qkv = (m.num_heads + 2 * m.kv_heads) * H / t
    matmul_outputs = b * L * a * (2 * D + qkv + 3 * F / t)
    # float32 attention probabilities, which only the XLA kernel materialises (splash streams them).
    fused = m.attention_impl in ("auto", "splash") and m.positions not in ("alibi", "relative") and L % 128 == 0
    scores = 0.0 if fused else b * heads * L * L * 4
    kept = {
        "full": b * L * D * a,
        "dots_with_no_batch_dims": matmul_outputs,
        "dots": matmul_outputs + (0.0 if fused else b * heads * L * L * a),
        "none": matmul_outputs + b * L * a * (4 * D + 2 * F / t) + scores,
    }[layout.remat]
    working = matmul_outputs + 2 * scores
    logits = 3 * b * (min(L, loss_chunk) if loss_chunk > 0 else L) * m.vocab_size / t * 4
    layer_weights = 2 * (total - 2 * m.vocab_size * D) / m.num_layers * a / t  # gathered weights, double-buffered
    return state + grads + m.num_layers * kept + working + logits + layer_weights


def estimate(m: ModelConfig, layout: Layout, chip: Chip, batch: int, seq_len: int, loss_chunk: int = 0) -> Estimate:
    """The step of `batch` sequences of `seq_len` tokens on data*fsdp*tensor chips per slice."""
    chips = layout.data * layout.fsdp * layout.tensor * layout.slices
    tokens = batch * seq_len
    model_flops, hw_flops = step_flops(m, tokens, seq_len, layout.remat)
    total, _ = param_count(m)
    a, f, t, d = BYTES[m.dtype], layout.fsdp, layout.tensor, layout.data
    ici = chip.ici_bw / 2
    b = batch // layout.grad_accum // (d * f * layout.slices)

    compute = hw_flops / chips / chip.peak_flops
    # Weights read three times per micro-batch (forward, two backward matmuls); the optimizer's pass over its state.
    hbm = (layout.grad_accum * 3 * total * a / t + 24 * total / (f * t)) / chip.hbm_bw
    gathers = 3 if layout.remat == "full" else 2
    fsdp = layout.grad_accum * (gathers * total * a / t + total * 4 / t) * (f - 1) / f / ici
    data = 2 * total * 4 / (f * t) * (d - 1) / d / ici
    all_reduces = 6 if layout.remat == "full" else 4  # per layer: attention and MLP outputs, forward and backward
    tensor = layout.grad_accum * m.num_layers * all_reduces * 2 * b * seq_len * m.d_model * a * (t - 1) / t / ici
    s = layout.slices
    dcn = 2 * total * 4 / (f * t * d) * (s - 1) / s / chip.dcn_bw
    step = max(compute, hbm, fsdp + data) + tensor + dcn
    parts = {"compute": compute, "hbm": hbm, "fsdp_data": fsdp + data, "tensor": tensor, "dcn": dcn}
    return Estimate(
        model_flops=model_flops,
        hardware_flops=hw_flops,
        memory_bytes=memory_per_chip(m, layout, batch, seq_len, loss_chunk),
        step_seconds=step,
        mfu=model_flops / (step * chips * chip.peak_flops),
        parts=parts,
    )
