"""Optimizers and learning-rate schedules (Optax), and the sharding of optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine / linear decay to lr * min_lr_ratio
    at `total_steps` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end)
    decay_steps = max(total_steps - warmup, 1)
    after = optax.linear_schedule(cfg.lr, end, decay_steps) if cfg.schedule == "linear" else optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), after], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices and embeddings; never on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("scale", "bias"), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(
            schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask, clipping_threshold=None
        )
    if cfg.grad_clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def opt_state_shardings(abstract_opt_state: Any, params_abstract: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state leaves that mirror a parameter (Adam moments, Lion momentum) take that parameter's
    sharding; everything else (step counts, Adafactor's factored statistics) is replicated."""
    by_path = {}
    for (path, a), s in zip(
        jax.tree_util.tree_flatten_with_path(params_abstract)[0], jax.tree.leaves(param_shardings)
    ):
        by_path[_dict_keys(path)] = (a.shape, s)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
