"""Building blocks: parameters with logical axis names, dense projections, norms, embeddings, MLPs.

Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used.
Shape suffixes: B batch, L length, D model, F MLP hidden, V vocab, N heads, H head dim, R LoRA rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.quant import kernel_array
from jaxllm.sharding import active_platform, constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype) -> nnx.Param:
    """A parameter initialised by `init`, carrying its logical axis `names` for sharding."""
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


# The key of LoRA dropout while a train step traces its loss (`dropout_key`); None elsewhere, so
# evaluation and generation never drop. Scanned stacks fold the layer index in (`fold_dropout_key`).
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jaxllm_dropout", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def dropout_active() -> bool:
    return _DROPOUT_KEY.get() is not None


def fold_dropout_key(data) -> contextlib.AbstractContextManager:
    """A different dropout key for each layer of a stack (a no-op when none is set)."""
    key = _DROPOUT_KEY.get()
    return contextlib.nullcontext() if key is None else dropout_key(jax.random.fold_in(key, data))


# Perturbations of the token embeddings while a train step traces its loss (`perturb_embeddings`): NEFTune's
# noise and adversarial deltas (train/noise.py). Each stack applies them to the token embeddings it is given
# (`perturbed`, from Stack.run); none is set in evaluation, and a run with a KV cache (generation) or a frozen
# model (blocks.without_embedding_noise) never takes them. So no loss needs to know.
@dataclasses.dataclass
class EmbeddingPerturbation:
    """What the i-th stack call of a traced loss adds to its token embeddings x_BLE [B, L, E]: NEFTune noise
    drawn from fold_in(neftune_key, i) (alpha > 0), and `deltas[i]` (float32, shaped as x_BLE). With `shapes` a
    list, each call appends its x_BLE shape (what `jax.eval_shape` of the loss reports to size the deltas)."""

    neftune_key: jax.Array | None = None
    neftune_alpha: float = 0.0
    deltas: Sequence[jax.Array] | None = None
    shapes: list | None = None
    calls: int = 0  # stack calls seen so far in this trace


_PERTURBATION: contextvars.ContextVar[EmbeddingPerturbation | None] = contextvars.ContextVar(
    "jaxllm_embedding_perturbation", default=None)


@contextlib.contextmanager
def perturb_embeddings(perturbation: EmbeddingPerturbation | None) -> Iterator[None]:
    """Token embeddings take `perturbation` inside the block; enter it inside the traced function, once per
    trace (it counts the stack calls of that trace)."""
    token = _PERTURBATION.set(perturbation)
    try:
        yield
    finally:
        _PERTURBATION.reset(token)


def perturbed(x_BLE: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """x_BLE with the active perturbation added (itself when none is active); padding (segment 0) keeps
    its embeddings under NEFTune and gets no gradient under an adversarial delta."""
    p = _PERTURBATION.get()
    if p is None:
        return x_BLE
    index = p.calls
    p.calls += 1
    if p.shapes is not None:
        p.shapes.append(x_BLE.shape)
    out_BLE = x_BLE.astype(jnp.float32)
    if p.neftune_alpha > 0:
        out_BLE = out_BLE + neftune_noise(jax.random.fold_in(p.neftune_key, index), segment_ids_BL, x_BLE.shape[-1],
                                          p.neftune_alpha)
    if p.deltas is not None:
        out_BLE = out_BLE + constrain(p.deltas[index], ("batch", "length", "act_embed"))
    return out_BLE.astype(x_BLE.dtype)


def neftune_noise(key: jax.Array, segment_ids_BL: jax.Array, dim: int, alpha: float) -> jax.Array:
    """NEFTune's noise (Jain et al., 2023) [B, L, dim] float32: uniform in [-m, m] with m = alpha / sqrt(L * dim),
    where L is the length of the sequence (packed segment) the position belongs to; 0 on padding (segment 0).
    An unpadded row of one sequence gets transformers' `neftune_post_forward_hook` noise (L = the row length)."""
    B, L = segment_ids_BL.shape
    # Segment lengths by a sum over ids made unique per row (segment ids are in [0, L]).
    ids_BL = segment_ids_BL.astype(jnp.int32) + (L + 1) * jnp.arange(B, dtype=jnp.int32)[:, None]
    counts = jax.ops.segment_sum(jnp.ones(B * L, jnp.float32), ids_BL.reshape(-1), num_segments=B * (L + 1))
    length_BL = counts[ids_BL]
    mag_BL = jnp.where(segment_ids_BL > 0, alpha / jnp.sqrt(length_BL * dim), 0.0)
    return jax.random.uniform(key, (B, L, dim), jnp.float32, -1.0, 1.0) * mag_BL[..., None]


class Dense(nnx.Module):
    """y = x . W (+ b), contracting the last `len(in_shape)` axes of x with the first axes of W.

    `in_shape`/`out_shape` may be multi-dimensional, e.g. D -> (N, H) for a query projection.
    Policies (models/lora.py) may store W quantised (a `QuantizedKernel`, dequantised here) and add a
    LoRA adapter: y += scale * dropout(x) . A . B with A [in..., R], B [R, out...].
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        names: Sequence[str],
        cfg: ModelConfig,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        init_std: float | None = None,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = DTYPES[cfg.dtype]
        pdtype = DTYPES[cfg.param_dtype]
        std = cfg.init_std if init_std is None else init_std
        self.kernel = make_param(
            rngs, nnx.initializers.normal(std), self.in_shape + self.out_shape, names, pdtype
        )
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, self.out_shape, names[len(self.in_shape):], pdtype)
            if use_bias
            else None
        )
        self.lora_a = self.lora_b = nnx.data(None)  # adapters: set by the LoRA policy
        self.lora_scale, self.lora_dropout, self.lora_id = 0.0, 0.0, 0

    def kernel_value(self) -> jax.Array:
        """W in the compute dtype (dequantised when stored quantised)."""
        return kernel_array(self.kernel, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        axes = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(x, self.kernel_value(), (axes, ((), ())))
        if self.lora_a is not None:
            key = _DROPOUT_KEY.get()
            if key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(key, self.lora_id), 1 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
            h = jax.lax.dot_general(x, self.lora_a[...].astype(self.dtype), (axes, ((), ())))
            y = y + self.lora_scale * jnp.tensordot(h, self.lora_b[...].astype(self.dtype), axes=1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (LLaMA) or LayerNorm (GPT-2), computed in float32, returned in the compute dtype."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.dtype = DTYPES[cfg.dtype]
        pdtype = DTYPES[cfg.param_dtype]
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("norm",), pdtype)
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (dim,), ("norm",), pdtype) if cfg.norm == "layernorm" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, E]; `attend` reuses it as the output projection (tied embeddings)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = DTYPES[cfg.dtype]
        self.embedding = make_param(
            rngs,
            nnx.initializers.normal(cfg.init_std),
            (cfg.vocab_size, cfg.embedding_dim),
            ("vocab", "embed"),
            DTYPES[cfg.param_dtype],
        )

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        # Gather the table over the parameter-sharding (fsdp) axis first: a lookup into a table sharded
        # on its embedding dimension forces the compiler into a full rematerialisation.
        table_VE = constrain(self.embedding[...], ("vocab", "act_embed"))
        return jnp.take(table_VE, tokens_BL, axis=0).astype(self.dtype)

    def attend(self, x_BLE: jax.Array) -> jax.Array:
        table_VE = self.embedding[...].astype(self.dtype)
        if active_platform() == "cpu":
            return _attend_cpu(x_BLE, table_VE)
        return jnp.einsum("ble,ve->blv", x_BLE, table_VE)


@jax.custom_vjp
def _attend_cpu(x_BLE: jax.Array, table_VE: jax.Array) -> jax.Array:
    """x . table^T, whose table gradient is computed as (x^T . g)^T: XLA's CPU backend otherwise
    transposes the [B, L, V] logits gradient to multiply it (the largest copy of the tiny model's
    backward pass); this way it transposes x and the [E, V] result, V/E times less data."""
    return jnp.einsum("ble,ve->blv", x_BLE, table_VE)


def _attend_cpu_fwd(x_BLE, table_VE):
    return _attend_cpu(x_BLE, table_VE), (x_BLE, table_VE)


def _attend_cpu_bwd(residuals, g_BLV):
    x_BLE, table_VE = residuals
    g_BLV = g_BLV.astype(x_BLE.dtype)
    return jnp.einsum("blv,ve->ble", g_BLV, table_VE), jnp.einsum("ble,blv->ev", x_BLE, g_BLV).T


_attend_cpu.defvjp(_attend_cpu_fwd, _attend_cpu_bwd)


ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}
GATED = ("swiglu", "geglu")


def mlp_hidden(kind: str, gate, up):
    """The MLP's hidden activation: act(gate) * up for gated kinds (SwiGLU, GeGLU), act(up) otherwise."""
    return ACTIVATIONS[kind](gate) * up if kind in GATED else ACTIVATIONS[kind](up)


class MLP(nnx.Module):
    """Gated: down(act(gate(x)) * up(x)) (LLaMA's SwiGLU, T5's GeGLU); else down(act(up(x))) (GPT-2, BERT)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, bias = cfg.d_model, cfg.mlp_dim, cfg.output_bias
        self.kind = cfg.mlp
        if cfg.mlp in GATED:
            self.gate = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs, use_bias=bias)
        self.up = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs, use_bias=bias)
        self.down = Dense((f,), (d,), ("mlp", "embed"), cfg, rngs, use_bias=bias)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h_BLF = mlp_hidden(self.kind, self.gate(x_BLD) if self.kind in GATED else None, self.up(x_BLD))
        h_BLF = constrain(h_BLF, ("batch", "length", "act_mlp"))
        return self.down(h_BLF)
