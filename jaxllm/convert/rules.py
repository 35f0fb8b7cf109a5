"""How one Hugging Face tensor maps to our parameters and back.

A `Rule` ties one HF tensor name (with `{i}` for the layer index, `{e}` for the expert) to one or more
of our parameter paths ("layers/attn/q/kernel") and a `kind` of transform. Every transform is a pure
reshape, transpose, split or concatenation, so jaxllm -> HF -> jaxllm is bit-exact.

Per-layer parameters have a leading axis over our scanned units, and per-expert ones an expert axis
after it. A unit may be a group of `moe.every` layers (models/blocks.py LayerGroup): the rules of its
j-th block read HF layer `stride * unit + start` (`layer_slots`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" is the layer index
    ours: tuple[str, ...]  # our parameter paths ("/"-separated, per layer for "{i}" rules)
    kind: str = "linear"
    # Number of leading input axes of our kernel (o-projection [N, H, D] has 2); 0 for biases.
    n_in: int = 1
    offset: int = 0  # "offset": rows of the HF table that we drop (RoBERTa/BART position padding)
    stride: int = 1  # our unit u holds HF layer stride * u + start (groups of MoE layers)
    start: int = 0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def lead(self) -> int:
        """Leading axes of our arrays that index HF tensors: the layer unit, then the expert."""
        return int(self.per_layer) + int("{e}" in self.hf)

    def name(self, index: tuple[int, ...] = ()) -> str:
        """The HF tensor for leading index (unit[, expert]) of our arrays."""
        if not self.lead:
            return self.hf
        layer = self.stride * index[0] + self.start if self.per_layer else None
        return self.hf.format(i=layer, e=index[-1])


def layer_slots(cfg) -> list[tuple[str, int, int, bool]]:
    """(our path prefix, stride, start, is a mixture) of each block in the scanned unit of a decoder."""
    if cfg.moe is None:
        return [("layers/", 1, 0, False)]
    k = cfg.moe.every
    if k == 1:
        return [("layers/", 1, 0, True)]
    return [(f"layers/dense{j}/", k, j, False) for j in range(k - 1)] + [("layers/moe/", k, k - 1, True)]


def in_slot(rules: Sequence[Rule], prefix: str, stride: int, start: int) -> list[Rule]:
    """Per-layer rules written for "layers/" moved to one block of a layer group."""
    return [dataclasses.replace(r, ours=tuple(prefix + o[len("layers/"):] for o in r.ours), stride=stride, start=start)
            for r in rules]


def linear(hf: str, ours: str, n_in: int = 1) -> Rule:
    """torch.nn.Linear weight [out, in] <-> our kernel [in..., out...]."""
    return Rule(hf, (ours,), "linear", n_in)


def conv1d(hf: str, ours: str, n_in: int = 1) -> Rule:
    """GPT-2's Conv1D weight [in, out] <-> our kernel [in..., out...]."""
    return Rule(hf, (ours,), "conv1d", n_in)


def copy(hf: str, ours: str) -> Rule:
    """Same values; biases are flat in HF ([N*H]) and may be [N, H] here."""
    return Rule(hf, (ours,), "copy", 0)


def to_ours(rule: Rule, t: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The HF tensor `t` as our arrays of `shapes` (one per path of the rule)."""
    kind = rule.kind
    if kind == "linear":
        return [t.T.reshape(shapes[0])]
    if kind in ("conv1d", "copy"):
        return [t.reshape(shapes[0])]
    if kind == "row":  # BART's final_logits_bias [1, V]
        return [t.reshape(shapes[0])]
    if kind == "offset":
        return [t[rule.offset:].reshape(shapes[0])]
    if kind == "split":  # GPT-2 c_attn: q, k, v side by side on the last axis
        return [p.reshape(s) for p, s in zip(np.split(t, len(shapes), axis=-1), shapes)]
    if kind == "bloom_qkv":  # BLOOM query_key_value: rows ordered (head, q/k/v, head_dim)
        n, h = shapes[0][-2], shapes[0][-1]
        if rule.n_in == 0:  # bias [N*3*H]
            t3 = t.reshape(n, 3, h)
            return [t3[:, j] for j in range(3)]
        t4 = t.reshape(n, 3, h, t.shape[-1])
        return [np.ascontiguousarray(t4[:, j].transpose(2, 0, 1)) for j in range(3)]
    raise ValueError(f"unknown rule kind {kind}")


def to_hf(rule: Rule, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Our arrays of a rule back to the HF tensor."""
    kind, a = rule.kind, arrays[0]
    if kind == "linear":
        return np.ascontiguousarray(_flat2(a, rule.n_in).T)
    if kind == "conv1d":
        return _flat2(a, rule.n_in)
    if kind == "copy":
        return a.reshape(-1) if a.ndim > 1 and rule.ours[0].endswith("bias") else a
    if kind == "row":
        return a.reshape(1, -1)
    if kind == "offset":
        return np.concatenate([np.zeros((rule.offset, *a.shape[1:]), a.dtype), a])
    if kind == "split":
        flat = [p.reshape(-1) if rule.n_in == 0 else _flat2(p, rule.n_in) for p in arrays]
        return np.concatenate(flat, axis=-1)
    if kind == "bloom_qkv":
        if rule.n_in == 0:
            return np.stack(arrays, axis=1).reshape(-1)
        stacked = np.stack([p.transpose(1, 2, 0) for p in arrays], axis=1)  # [N, 3, H, D]
        return stacked.reshape(-1, stacked.shape[-1])
    raise ValueError(f"unknown rule kind {kind}")


def _flat2(a: np.ndarray, n_in: int) -> np.ndarray:
    return a.reshape(math.prod(a.shape[:n_in]), -1)
