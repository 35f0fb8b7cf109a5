"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter after the Hugging Face module it wraps: `base_model.model.{module}.lora_A.weight`
[R, in] and `lora_B.weight` [out, R]. Our adapters live beside our kernels (`layers/attn/q/lora_a`
[layers, in..., R], `lora_b` [layers, R, out...]); the family's conversion rules say which HF module a
kernel is, so both directions reuse them. Only projections stored as a plain `nn.Linear` weight
(LLaMA, Mistral, Qwen2, Mixtral and Qwen2-MoE attention and MLPs) can carry PEFT adapters. A reward model's
`score` head, which LoRA trains in full, is PEFT's `modules_to_save` (task_type SEQ_CLS): `score.weight`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.config import LoraConfig, ModelConfig
from jaxllm.convert.hf_io import ConversionError
from jaxllm.convert.registry import family_for, leaves, nest
from jaxllm.convert.rules import Rule
from jaxllm.models import lora
from jaxllm.utils import atomic_write_text

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SCORE = "score.weight"  # a reward model's head, trained in full beside the adapters (modules_to_save)


def _projections(cfg: ModelConfig) -> dict[str, Rule]:
    """Our projection path ("layers/attn/q") -> the rule of its kernel, for every linear kernel rule."""
    rules = family_for(cfg).rules(lora.base_config(cfg))
    return {r.ours[0][: -len("/kernel")]: r for r in rules
            if r.kind == "linear" and len(r.ours) == 1 and r.ours[0].endswith("/kernel") and "{e}" not in r.hf}


def _module(rule: Rule, at: tuple[int, ...]) -> str:
    return rule.name(at)[: -len(".weight")]


def save_peft_adapters(params: Any, cfg: ModelConfig, out_dir: str | Path,
                       base_model_name_or_path: str | None = None) -> Path:
    """Writes the adapters of `params` (a model with `cfg.lora`) as a PEFT LoRA adapter directory."""
    if cfg.lora is None:
        raise ConversionError("this model has no LoRA adapters (model.lora is not set)")
    flat = leaves(params)
    projections = _projections(cfg)
    adapted = sorted({p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a")})
    tensors, leaf_names = {}, {}
    for path in adapted:
        rule = projections.get(path)
        if rule is None:
            raise ConversionError(f"{path} has an adapter but is not a plain linear weight in {cfg.family}; PEFT "
                                  "export supports adapters on separate nn.Linear projections")
        a, b = flat[f"{path}/lora_a"], flat[f"{path}/lora_b"]
        for at in itertools.product(*map(range, a.shape[:rule.lead])):
            a1, b1 = np.asarray(jax.device_get(a[at]), np.float32), np.asarray(jax.device_get(b[at]), np.float32)
            name = PREFIX + _module(rule, at)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a1.reshape(-1, a1.shape[-1]).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b1.reshape(b1.shape[0], -1).T)
        leaf_names.setdefault(rule.hf.split(".")[-2], []).append(path)
    if cfg.head == "reward":  # the fresh head trained in full: PEFT's modules_to_save, stored under its own name
        tensors[PREFIX + SCORE] = np.ascontiguousarray(np.asarray(jax.device_get(flat["score/kernel"]), np.float32).T)
    # Leaf names ("q_proj") when they pick exactly our adapted projections, else exact module names.
    every = {leaf: [p for p, r in projections.items() if r.hf.split(".")[-2] == leaf] for leaf in leaf_names}
    if all(sorted(every[leaf]) == sorted(paths) for leaf, paths in leaf_names.items()):
        targets: Any = sorted(leaf_names)
    else:
        modules = sorted(name[len(PREFIX): -len(".lora_A.weight")] for name in tensors if name.endswith("lora_A.weight"))
        targets = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "SEQ_CLS" if cfg.head == "reward" else "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
            "use_rslora": cfg.lora.rslora, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": ["score"] if cfg.head == "reward" else None, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        }
        atomic_write_text(out / CONFIG, json.dumps(config, indent=2))
    return out


def read_peft_config(directory: str | Path) -> LoraConfig:
    """Our LoraConfig for a PEFT adapter (targets are filled in from the tensors by `load_peft_adapters`).
    Variants we do not implement are refused."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ConversionError(f"{directory} has no {CONFIG}; pass a PEFT adapter directory (save_pretrained of a PeftModel)")
    c = json.loads(path.read_text())
    unsupported = {
        "peft_type": c.get("peft_type") != "LORA", "use_dora": bool(c.get("use_dora")),
        "bias": c.get("bias", "none") != "none", "rank_pattern": bool(c.get("rank_pattern")),
        "alpha_pattern": bool(c.get("alpha_pattern")),
        "modules_to_save": bool(set(c.get("modules_to_save") or ()) - {"score", "classifier"}),  # a reward head only
        "fan_in_fan_out": bool(c.get("fan_in_fan_out")), "layer_replication": bool(c.get("layer_replication")),
        "lora_bias": bool(c.get("lora_bias")), "trainable_token_indices": bool(c.get("trainable_token_indices")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConversionError(f"PEFT adapter {directory}: {', '.join(f'{k}={c.get(k)!r}' for k in bad)} is not supported; "
                              "jaxllm loads plain LoRA (one rank and alpha, no bias, no extra trained modules)")
    return LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                      rslora=bool(c.get("use_rslora")))


def load_peft_adapters(directory: str | Path, params: Any, cfg: ModelConfig, shardings: Any = None
                       ) -> tuple[Any, ModelConfig]:
    """(params with the adapters added, cfg with model.lora) for base `params` of `cfg` (e.g. `from_hf`).

    `shardings`: a function of the new config giving its parameter shardings (default: unsharded)."""
    if cfg.lora is not None or cfg.quant is not None:
        raise ConversionError("load PEFT adapters onto the plain base model (model.lora and model.quant unset)")
    lora_cfg = read_peft_config(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ConversionError(f"{directory} has no {WEIGHTS} (PEFT's .bin pickles are never loaded)")
    with safe_open(weights, framework="numpy") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    stored = {re.sub(r"\.default(\.weight)$", r"\1", k): v for k, v in stored.items()}  # adapter name, if kept
    flat = leaves(params)
    adapters: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for path, rule in _projections(cfg).items():
        kernel = flat[f"{path}/kernel"]
        lead = list(itertools.product(*map(range, kernel.shape[:rule.lead])))
        names = [PREFIX + _module(rule, at) for at in lead]
        present = [f"{n}.lora_A.weight" in stored for n in names]
        if not any(present):
            continue
        if not all(present):
            raise ConversionError(f"the adapter covers only some layers of {path} (layers_to_transform); jaxllm "
                                  "adapts a projection in every layer")
        in_shape, out_shape = kernel.shape[rule.lead: rule.lead + rule.n_in], kernel.shape[rule.lead + rule.n_in:]
        a = [stored[f"{n}.lora_A.weight"].T.reshape(*in_shape, -1) for n in names]
        b = [stored[f"{n}.lora_B.weight"].T.reshape(-1, *out_shape) for n in names]
        adapters[f"{path}/lora_a"] = np.stack(a).reshape(*kernel.shape[:rule.lead], *a[0].shape).astype(np.float32)
        adapters[f"{path}/lora_b"] = np.stack(b).reshape(*kernel.shape[:rule.lead], *b[0].shape).astype(np.float32)
        used.update(f"{n}.lora_{x}.weight" for n in names for x in "AB")
    if PREFIX + SCORE in stored:
        if cfg.head != "reward":
            raise ConversionError(f"the PEFT adapter in {directory} trains a reward head (score.weight) but the base "
                                  "model has none; load it onto a *ForSequenceClassification base")
        score = flat["score/kernel"]
        params = lora.combine({k: v for k, v in params.items() if k != "score"},
                              {"score": {"kernel": jax.numpy.asarray(stored[PREFIX + SCORE].T.astype(score.dtype))}})
        used.add(PREFIX + SCORE)
    unused = sorted(set(stored) - used)
    if unused:
        raise ConversionError(f"PEFT adapter tensors jaxllm cannot place ({', '.join(unused[:3])}"
                              f"{' ...' if len(unused) > 3 else ''}): adapters on modules that are not plain projections")
    if not adapters:
        raise ConversionError(f"the PEFT adapter in {directory} holds no LoRA weights")
    paths = sorted({p.rsplit("/", 1)[0] for p in adapters})
    lora_cfg = dataclasses.replace(lora_cfg, targets="^(" + "|".join(re.escape(p) for p in paths) + ")$")
    new_cfg = dataclasses.replace(cfg, lora=lora_cfg)
    tree = lora.combine(params, nest({k: jax.numpy.asarray(v) for k, v in adapters.items()}))
    if shardings is not None:
        tree = jax.device_put(tree, shardings(new_cfg))
    return tree, new_cfg
