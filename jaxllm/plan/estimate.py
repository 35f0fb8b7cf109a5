"""An analytical model of one train step on a TPU slice: FLOPs, memory per chip and step time.

It ranks many layouts in milliseconds; the compiler then checks the best of them (`plan.compile`).
FLOPs come from the exact parameter counts of the model's shapes (`models.param_counts`; the
compiler's own count visits a scanned layer once, so it cannot be used for a whole step). Memory and time are first-order:

- state: float32 parameters, gradients and Adam moments, sharded over fsdp x tensor (routed experts
  also over the expert axis);
- activations of one micro-batch: what the remat policy keeps per layer, one layer's working set,
  the float32 logits of one loss chunk (`train.loss_chunk` positions), and the attention
  probabilities only where the XLA kernel materialises them (splash attention on TPUs keeps none);
- time: max(compute at peak, HBM traffic, fsdp/data collectives overlapped with compute)
  + tensor-parallel all-reduces and the MoE token exchange over the expert axis (on the critical
  path) + the cross-slice gradient all-reduce.
- mixtures of experts: FLOPs count the experts a token visits; memory counts the rows the dispatch
  holds (dropless: every copy of the expert group's tokens, see `_routed_rows`).
  A collective over one mesh axis is taken to use half the chip's total ICI bandwidth.
"""

from __future__ import annotations

import dataclasses

from jaxllm import models
from jaxllm.config import ModelConfig
from jaxllm.models.layers import GATED
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
    expert: int = 1

    def describe(self) -> str:
        dcn = f"{self.slices}x" if self.slices > 1 else ""
        expert = f" expert={self.expert}" if self.expert > 1 else ""
        return (f"data={dcn}{self.data} fsdp={self.fsdp} tensor={self.tensor}{expert} remat={self.remat} "
                f"accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class Estimate:
    model_flops: float  # per step, all chips: matmuls forward + backward (what MFU counts)
    hardware_flops: float  # per step, all chips, with the forward recomputed by remat
    memory_bytes: float  # per chip
    step_seconds: float
    mfu: float
    parts: dict[str, float]  # seconds: compute, hbm, fsdp_data, tensor, dcn


def _mlp_params(m: ModelConfig, width: int) -> int:
    return m.d_model * width * (3 if m.mlp in GATED else 2)


def moe_layers(m: ModelConfig) -> int:
    return m.num_layers // m.moe.every if m.moe is not None else 0


def expert_params(m: ModelConfig) -> int:
    """Parameters of the routed experts (the ones split over the `expert` mesh axis)."""
    if m.moe is None:
        return 0
    return moe_layers(m) * m.moe.num_experts * _mlp_params(m, m.moe.expert_mlp_dim or m.mlp_dim)


def matmul_params(m: ModelConfig) -> int:
    """Parameters that multiply every token (what FLOPs count, `models.param_counts` being the one
    exact count): the active ones (a mixture's experts a token visits) but the tables read by index,
    and the output projection once more when it is the tied input table (a matmul of every token)."""
    counts = models.param_counts(m)
    head = m.vocab_size * m.embedding_dim if m.tie_embeddings and m.head in ("lm", "mlm") else 0
    return counts["active"] - counts["embedding_lookups"] + head


def flops_per_token(m: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token of sequences of `seq_len`: 6 x matmul parameters (forward 2N, backward
    4N) plus attention scores and weighted sum, 12 x layers x heads x head_dim x seq_len. PaLM's
    convention (`causal=False`) counts the full T x T scores; MaxText's and torchtitan's (`causal=True`)
    half of a decoder's self-attention, which a causal mask leaves. Encoder layers attend both ways."""
    d_attn = m.num_heads * m.dim_per_head
    if m.arch == "encoder_decoder":  # decoder: causal self-attention plus full cross-attention
        attention = m.num_layers + m.decoder_layers * ((0.5 + 1.0) if causal else 2.0)
    elif m.arch == "encoder":
        attention = float(m.num_layers)
    else:
        attention = m.num_layers * (0.5 if causal else 1.0)
    return 6.0 * matmul_params(m) + 12.0 * attention * d_attn * seq_len


def step_flops(m: ModelConfig, tokens: int, seq_len: int, remat: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over `tokens` tokens (all chips together)."""
    # Scores and the weighted sum: 2 matmuls of L x L x heads*head_dim per layer, full (not causal-skipped).
    attn_fwd = 2 * 2 * m.num_layers * seq_len * m.num_heads * m.dim_per_head
    forward = flops_per_token(m, seq_len) / 3
    model = flops_per_token(m, seq_len) * tokens
    experts_fwd = 0.0 if m.moe is None else (
        2 * moe_layers(m) * m.moe.experts_per_token * _mlp_params(m, m.moe.expert_mlp_dim or m.mlp_dim))
    # The dots policies save dot_general outputs only: dropless experts (ragged_dot) are recomputed, and
    # capacity experts (einsums batched over experts) under dots_with_no_batch_dims.
    dropless = m.moe is not None and m.moe.dispatch == "dropless"
    recompute = {
        "none": 0.0,
        "dots": experts_fwd if dropless else 0.0,
        "dots_with_no_batch_dims": attn_fwd + experts_fwd,
        "full": forward,
    }[remat]
    return model, model + recompute * tokens


def _routed_rows(m: ModelConfig, layout: Layout, tokens: int) -> float:
    """Rows one chip's expert matmuls hold per MoE layer for `tokens` tokens of its own batch shard:
    dropless dispatch gathers the tokens of the whole expert group and sorts all their copies (the
    ones routed elsewhere sort last, into no group); capacity dispatch pads to the capacity."""
    k = m.moe.experts_per_token
    if m.moe.dispatch == "dropless":
        return tokens * layout.expert * k
    return tokens * k * m.moe.capacity_factor


def memory_per_chip(m: ModelConfig, layout: Layout, batch: int, seq_len: int, loss_chunk: int = 0) -> float:
    total = models.param_counts(m)["total"]
    experts = expert_params(m)
    shards = layout.fsdp * layout.tensor
    placed = (total - experts) / shards + experts / (shards * layout.expert)  # parameters held by a chip
    p_bytes = BYTES[m.param_dtype]
    state = placed * (p_bytes + 8)  # parameters + Adam's two float32 moments
    grads = placed * 4
    a = BYTES[m.dtype]
    t = layout.tensor
    b = batch // layout.grad_accum // (layout.data * layout.fsdp * layout.expert * layout.slices)
    D, F, L, H = m.d_model, m.mlp_dim, seq_len, m.dim_per_head
    heads = m.num_heads / t
    qkv = (m.num_heads + 2 * m.kv_heads) * H / t
    attn_outputs = b * L * a * (2 * D + qkv)
    dense_outputs = attn_outputs + b * L * a * 3 * F / t
    n_moe = moe_layers(m)
    if n_moe:
        Fe = m.moe.expert_mlp_dim or F
        rows = _routed_rows(m, layout, b * L)
        # sorted copies in, gate/up/hidden out, results back; plus the shared expert
        moe_outputs = attn_outputs + a * rows * (2 * D + 3 * Fe / t) + b * L * a * 3 * m.moe.shared_mlp_dim / t
    else:
        moe_outputs = 0.0
    # float32 attention probabilities, which only the XLA kernel materialises (splash streams them).
    fused = m.attention_impl in ("auto", "splash") and m.positions not in ("alibi", "relative") and L % 128 == 0
    scores = 0.0 if fused else b * heads * L * L * 4

    def kept(matmul_outputs: float, saved_by_dots: float, saved_by_no_batch_dots: float) -> float:
        return {
            "full": b * L * D * a,
            "dots_with_no_batch_dims": saved_by_no_batch_dots,
            "dots": saved_by_dots + (0.0 if fused else b * heads * L * L * a),
            "none": matmul_outputs + b * L * a * (4 * D + 2 * F / t) + scores,
        }[layout.remat]

    per_layer = (m.num_layers - n_moe) * kept(dense_outputs, dense_outputs, dense_outputs)
    if n_moe:  # see step_flops: which expert outputs the dots policies save
        dropless = m.moe.dispatch == "dropless"
        per_layer += n_moe * kept(moe_outputs, attn_outputs if dropless else moe_outputs, attn_outputs)
    working = max(dense_outputs, moe_outputs) + 2 * scores
    logits = 3 * b * (min(L, loss_chunk) if loss_chunk > 0 else L) * m.vocab_size / t * 4
    # one layer's weights gathered over fsdp, double-buffered (experts stay split over the expert axis)
    layer_weights = 2 * (placed * shards - 2 * m.vocab_size * D) / m.num_layers * a / t
    return state + grads + per_layer + working + logits + layer_weights


def estimate(m: ModelConfig, layout: Layout, chip: Chip, batch: int, seq_len: int, loss_chunk: int = 0) -> Estimate:
    """The step of `batch` sequences of `seq_len` tokens on data*fsdp*tensor chips per slice."""
    chips = layout.data * layout.fsdp * layout.tensor * layout.expert * layout.slices
    tokens = batch * seq_len
    model_flops, hw_flops = step_flops(m, tokens, seq_len, layout.remat)
    total = models.param_counts(m)["total"]
    a, f, t, d = BYTES[m.dtype], layout.fsdp, layout.tensor, layout.data
    ici = chip.ici_bw / 2
    b = batch // layout.grad_accum // (d * f * layout.expert * layout.slices)

    compute = hw_flops / chips / chip.peak_flops
    e = layout.expert
    experts = expert_params(m)
    placed = total - experts + experts / e  # one expert group's copy of the model
    # Weights read three times per micro-batch (forward, two backward matmuls); the optimizer's pass over its state.
    hbm = (layout.grad_accum * 3 * placed * a / t + 24 * placed / (f * t)) / chip.hbm_bw
    gathers = 3 if layout.remat == "full" else 2
    fsdp = layout.grad_accum * (gathers * placed * a / t + placed * 4 / t) * (f - 1) / f / ici
    # gradients all-reduced over the data axis; the dense ones (replicated over experts) over expert too
    data = (2 * placed * 4 / (f * t) * (d - 1) / d + 2 * (total - experts) * 4 / (f * t) * (e - 1) / e) / ici
    all_reduces = 6 if layout.remat == "full" else 4  # per layer: attention and MLP outputs, forward and backward
    tensor = layout.grad_accum * m.num_layers * all_reduces * 2 * b * seq_len * m.d_model * a * (t - 1) / t / ici
    # Token exchange of the MoE layers over the expert axis: (all-gather + reduce-scatter) forward and
    # backward (and again when remat recomputes the forward), on the critical path.
    exchanges = 3 if layout.remat == "full" else 2
    tensor += (layout.grad_accum * moe_layers(m) * exchanges * 2 * b * seq_len * m.d_model * a * (e - 1) / ici)
    s = layout.slices
    dcn = 2 * placed * 4 / (f * t * d) * (s - 1) / s / chip.dcn_bw
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
