"""Mixture-of-experts decoders: Mixtral and Qwen2-MoE (LLaMA-style attention, MoE MLPs).

HF stores one tensor per expert (`experts.{e}.w1.weight`); we stack them on the expert axis of
`layers/.../mlp/experts/{gate,up,down}`. Qwen2-MoE's `decoder_sparse_step` k makes every k-th layer
a mixture: we scan groups of k layers (`rules.layer_slots`), and its HF layer i lands in group i // k.

HF's load-balancing loss is k (experts per token) times ours (docs/moe.md), so
`aux_loss_weight = router_aux_loss_coef * k`; neither family has a router z-loss (weight 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.config import ModelConfig, MoEConfig
from jaxllm.convert.families import (
    Family, _llama_config, _llama_hf, llama_attention_rules, llama_outer_rules, register, swiglu_rules)
from jaxllm.convert.hf_io import ConversionError
from jaxllm.convert.rules import Rule, in_slot, layer_slots, linear


def _experts(hf_module: str, names: dict[str, str]) -> list[Rule]:
    """Per-expert HF linears `{hf_module}.{e}.{name}.weight` <-> our stacked experts kernels."""
    return [linear(f"{hf_module}.{{e}}.{hf}.weight", f"layers/mlp/experts/{ours}") for ours, hf in names.items()]


def _check_scannable(cfg: ModelConfig) -> None:
    if cfg.num_layers % cfg.moe.every:
        raise ConversionError(
            f"{cfg.num_layers} layers do not divide into groups of decoder_sparse_step={cfg.moe.every}; "
            "jaxllm scans whole groups of layers")


def _slot_rules(cfg: ModelConfig, mixture: list[Rule], dense: list[Rule]) -> list[Rule]:
    rules = llama_outer_rules(cfg)
    for prefix, stride, start, is_moe in layer_slots(cfg):
        rules += in_slot(llama_attention_rules(cfg) + (mixture if is_moe else dense), prefix, stride, start)
    return rules


# --------------------------------------------------------------------------- Mixtral


def _mixtral_config(hf: dict[str, Any]) -> ModelConfig:
    k = hf["num_experts_per_tok"]
    base = _llama_config(dict(hf, model_type="llama"))
    return dataclasses.replace(
        base, sliding_window=hf.get("sliding_window"),
        moe=MoEConfig(num_experts=hf["num_local_experts"], experts_per_token=k, router="topk_softmax",
                      aux_loss_weight=hf.get("router_aux_loss_coef", 0.001) * k, z_loss_weight=0.0))


def _mixtral_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if m is None or m.every != 1 or m.shared_mlp_dim or m.router != "topk_softmax" or cfg.attention_bias:
        raise ConversionError(
            "a Mixtral export needs model.moe with every=1, no shared expert, router=topk_softmax and no "
            "attention bias; this model differs (export it as the family it matches)")
    out = _llama_hf(dataclasses.replace(cfg, moe=None), "llama")
    out.pop("attention_bias")
    out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], sliding_window=cfg.sliding_window,
               intermediate_size=m.expert_mlp_dim or cfg.mlp_dim, num_local_experts=m.num_experts,
               num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=m.aux_loss_weight / m.experts_per_token)
    return out


def _mixtral_rules(cfg: ModelConfig) -> list[Rule]:
    p = "model.layers.{i}.block_sparse_moe"
    mixture = [linear(f"{p}.gate.weight", "layers/mlp/router/kernel")]
    mixture += _experts(f"{p}.experts", {"gate": "w1", "up": "w3", "down": "w2"})
    return _slot_rules(cfg, mixture, [])


# --------------------------------------------------------------------------- Qwen2-MoE


def _qwen2_moe_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("mlp_only_layers"):
        raise ConversionError("Qwen2-MoE mlp_only_layers is not supported (dense layers come every "
                              "decoder_sparse_step only)")
    if hf.get("use_sliding_window"):
        raise ConversionError("Qwen2-MoE use_sliding_window=true (per-layer windows) is not supported")
    if not hf.get("num_experts"):
        raise ConversionError("Qwen2-MoE with num_experts=0 has no experts; convert it as qwen2")
    k = hf["num_experts_per_tok"]
    base = _llama_config(dict(hf, model_type="llama"))
    cfg = dataclasses.replace(
        base, attention_bias=bool(hf.get("qkv_bias", True)),
        moe=MoEConfig(num_experts=hf["num_experts"], experts_per_token=k, every=hf.get("decoder_sparse_step", 1),
                      expert_mlp_dim=hf["moe_intermediate_size"], shared_mlp_dim=hf["shared_expert_intermediate_size"],
                      shared_gate=True, router="topk_softmax" if hf.get("norm_topk_prob") else "softmax_topk",
                      aux_loss_weight=hf.get("router_aux_loss_coef", 0.001) * k, z_loss_weight=0.0))
    _check_scannable(cfg)
    return cfg


def _qwen2_moe_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if m is None or not m.shared_mlp_dim or not m.shared_gate:
        raise ConversionError("a Qwen2-MoE export needs model.moe with a gated shared expert (shared_mlp_dim, shared_gate)")
    out = _llama_hf(dataclasses.replace(cfg, moe=None), "llama")
    out.pop("attention_bias")
    out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], qkv_bias=cfg.attention_bias,
               use_sliding_window=False, num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
               decoder_sparse_step=m.every, moe_intermediate_size=m.expert_mlp_dim or cfg.mlp_dim,
               shared_expert_intermediate_size=m.shared_mlp_dim, norm_topk_prob=m.router == "topk_softmax",
               mlp_only_layers=[], router_aux_loss_coef=m.aux_loss_weight / m.experts_per_token)
    return out


def _qwen2_moe_rules(cfg: ModelConfig) -> list[Rule]:
    p = "model.layers.{i}.mlp"
    mixture = [linear(f"{p}.gate.weight", "layers/mlp/router/kernel"),
               linear(f"{p}.shared_expert_gate.weight", "layers/mlp/shared_gate/kernel")]
    mixture += _experts(f"{p}.experts", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    mixture += swiglu_rules(f"{p}.shared_expert", "layers/mlp/shared")
    return _slot_rules(cfg, mixture, swiglu_rules(p, "layers/mlp"))


register(Family("mixtral", ("mixtral",), "model.", _mixtral_config, _mixtral_hf, _mixtral_rules,
                ignored=(r"\.rotary_emb\.inv_freq$",)))
register(Family("qwen2_moe", ("qwen2_moe",), "model.", _qwen2_moe_config, _qwen2_moe_hf, _qwen2_moe_rules,
                ignored=(r"\.rotary_emb\.inv_freq$",)))
