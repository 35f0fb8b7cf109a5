"""Every Hugging Face family we convert: its config.json <-> ModelConfig, and its tensor names.

A config field we do not implement (an unknown rope scaling type, an activation we lack, ...) is a
`ConversionError`, never a silently different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.convert.hf_io import ConversionError
from jaxllm.convert.rules import Rule, conv1d, copy, linear


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base_prefix: str  # what HF puts before the backbone's names ("model.", "bert.", ...)
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    ignored: tuple[str, ...] = ()  # HF tensors that carry nothing we need (buffers, tied copies)


def _require(hf: dict, key: str, allowed, what: str = "") -> Any:
    value = hf.get(key)
    if value not in allowed:
        raise ConversionError(
            f"config.json {key}={value!r}{what} is not supported; jaxllm implements {', '.join(map(repr, allowed))}"
        )
    return value


ACT_UNGATED = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
ACT_NAMES = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}


def _activation(hf: dict, key: str) -> str:
    return ACT_UNGATED[_require(hf, key, tuple(ACT_UNGATED))]


# --------------------------------------------------------------------------- LLaMA, Mistral, Qwen2


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(type="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ConversionError(f"rope scaling type {kind!r} is not supported; jaxllm implements 'linear' and 'llama3'")


def _llama_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",))
    if hf.get("mlp_bias"):
        raise ConversionError("config.json mlp_bias=true is not supported (LLaMA MLPs without biases only)")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConversionError("config.json pretraining_tp != 1 is not supported")
    if hf["model_type"] == "qwen2" and hf.get("use_sliding_window"):
        raise ConversionError("Qwen2 use_sliding_window=true (per-layer windows) is not supported")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu", positions="rope", rope_theta=theta, rope_scaling=scaling,
        sliding_window=hf.get("sliding_window") if hf["model_type"] == "mistral" else None,
        attention_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _llama_hf(cfg: ModelConfig, model_type: str) -> dict:
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type=s.type, factor=s.factor)
        if s.type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    out = {
        "model_type": model_type, "architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
    }
    if model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        out["use_sliding_window"] = False
    return out


def llama_attention_rules(cfg: ModelConfig) -> list[Rule]:
    """A LLaMA-style layer without its MLP: attention and the two norms (per-layer "layers/" paths)."""
    p = "model.layers.{i}."
    rules = []
    for name in "qkv":
        rules.append(linear(f"{p}self_attn.{name}_proj.weight", f"layers/attn/{name}/kernel"))
        if cfg.attention_bias:
            rules.append(copy(f"{p}self_attn.{name}_proj.bias", f"layers/attn/{name}/bias"))
    return rules + [
        linear(f"{p}self_attn.o_proj.weight", "layers/attn/o/kernel", n_in=2),
        copy(f"{p}input_layernorm.weight", "layers/attn_norm/scale"),
        copy(f"{p}post_attention_layernorm.weight", "layers/mlp_norm/scale"),
    ]


def swiglu_rules(hf: str, ours: str) -> list[Rule]:
    """gate_proj/up_proj/down_proj under HF module `hf` <-> our gated MLP at `ours`."""
    return [linear(f"{hf}.{n}_proj.weight", f"{ours}/{n}/kernel") for n in ("gate", "up", "down")]


def llama_outer_rules(cfg: ModelConfig) -> list[Rule]:
    """The tensors outside the layers: embeddings, final norm, untied output head."""
    rules = [copy("model.embed_tokens.weight", "embed/embedding"), copy("model.norm.weight", "final_norm/scale")]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.weight", "lm_head/kernel"))
    return rules


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    return llama_outer_rules(cfg) + llama_attention_rules(cfg) + swiglu_rules("model.layers.{i}.mlp", "layers/mlp")


# --------------------------------------------------------------------------- GPT-2, BLOOM (ALiBi)


def _gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("GPT-2 scale_attn_by_inverse_layer_idx=true is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        mlp_dim=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=_activation(hf, "activation_function"),
        positions="learned", attention_bias=True, output_bias=True, tie_embeddings=True,
    )


def _gpt2_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_seq_len,
        "activation_function": ACT_NAMES[cfg.mlp], "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
    }


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    p = "transformer.h.{i}."
    qkv = tuple(f"layers/attn/{n}/kernel" for n in "qkv")
    return [
        copy("transformer.wte.weight", "embed/embedding"),
        copy("transformer.wpe.weight", "embeddings/positions/embedding"),
        copy(f"{p}ln_1.weight", "layers/attn_norm/scale"), copy(f"{p}ln_1.bias", "layers/attn_norm/bias"),
        Rule(f"{p}attn.c_attn.weight", qkv, "split", 1),
        Rule(f"{p}attn.c_attn.bias", tuple(f"layers/attn/{n}/bias" for n in "qkv"), "split", 0),
        conv1d(f"{p}attn.c_proj.weight", "layers/attn/o/kernel", n_in=2), copy(f"{p}attn.c_proj.bias", "layers/attn/o/bias"),
        copy(f"{p}ln_2.weight", "layers/mlp_norm/scale"), copy(f"{p}ln_2.bias", "layers/mlp_norm/bias"),
        conv1d(f"{p}mlp.c_fc.weight", "layers/mlp/up/kernel"), copy(f"{p}mlp.c_fc.bias", "layers/mlp/up/bias"),
        conv1d(f"{p}mlp.c_proj.weight", "layers/mlp/down/kernel"), copy(f"{p}mlp.c_proj.bias", "layers/mlp/down/bias"),
        copy("transformer.ln_f.weight", "final_norm/scale"), copy("transformer.ln_f.bias", "final_norm/bias"),
    ]


def _bloom_config(hf: dict) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConversionError("BLOOM apply_residual_connection_post_layernorm=true is not supported")
    d = hf.get("hidden_size") or hf["n_embed"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"], mlp_dim=4 * d,
        max_seq_len=hf.get("seq_length", 2048), norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu", positions="alibi", attention_bias=True, output_bias=True, embed_norm=True, tie_embeddings=True,
    )


def _bloom_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "layer_norm_epsilon": cfg.norm_eps, "seq_length": cfg.max_seq_len,
        "tie_word_embeddings": True,
    }


def _bloom_rules(cfg: ModelConfig) -> list[Rule]:
    p = "transformer.h.{i}."
    return [
        copy("transformer.word_embeddings.weight", "embed/embedding"),
        copy("transformer.word_embeddings_layernorm.weight", "embeddings/norm/scale"),
        copy("transformer.word_embeddings_layernorm.bias", "embeddings/norm/bias"),
        copy(f"{p}input_layernorm.weight", "layers/attn_norm/scale"),
        copy(f"{p}input_layernorm.bias", "layers/attn_norm/bias"),
        Rule(f"{p}self_attention.query_key_value.weight", tuple(f"layers/attn/{n}/kernel" for n in "qkv"), "bloom_qkv", 1),
        Rule(f"{p}self_attention.query_key_value.bias", tuple(f"layers/attn/{n}/bias" for n in "qkv"), "bloom_qkv", 0),
        linear(f"{p}self_attention.dense.weight", "layers/attn/o/kernel", n_in=2),
        copy(f"{p}self_attention.dense.bias", "layers/attn/o/bias"),
        copy(f"{p}post_attention_layernorm.weight", "layers/mlp_norm/scale"),
        copy(f"{p}post_attention_layernorm.bias", "layers/mlp_norm/bias"),
        linear(f"{p}mlp.dense_h_to_4h.weight", "layers/mlp/up/kernel"), copy(f"{p}mlp.dense_h_to_4h.bias", "layers/mlp/up/bias"),
        linear(f"{p}mlp.dense_4h_to_h.weight", "layers/mlp/down/kernel"), copy(f"{p}mlp.dense_4h_to_h.bias", "layers/mlp/down/bias"),
        copy("transformer.ln_f.weight", "final_norm/scale"), copy("transformer.ln_f.bias", "final_norm/bias"),
    ]


# --------------------------------------------------------------------------- reward heads (any decoder)

REWARD_SUFFIX = "ForSequenceClassification"


def _is_reward(hf: dict) -> bool:
    return any(str(a).endswith(REWARD_SUFFIX) for a in hf.get("architectures") or [])


def _with_reward_head(family: Family) -> Family:
    """`family` that also converts Hugging Face `*ForSequenceClassification` with num_labels=1 <-> a decoder
    with model.head=reward: the backbone's tensors as the LM's, `score.weight` [1, D] as our `score/kernel`."""

    def config_from_hf(hf: dict) -> ModelConfig:
        cfg = family.config_from_hf(hf)
        if not _is_reward(hf):
            return cfg
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        if labels != 1 or cfg.arch != "decoder":
            raise ConversionError(
                f"{hf['architectures'][0]} with num_labels={labels}: jaxllm converts reward models, decoders with "
                "num_labels=1 (a scalar score)")
        return dataclasses.replace(cfg, head="reward")

    def config_to_hf(cfg: ModelConfig) -> dict:
        out = family.config_to_hf(cfg)
        if cfg.head == "reward":
            causal = out["architectures"][0]
            stem = causal.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
            out.update(architectures=[stem + REWARD_SUFFIX], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out

    def rules(cfg: ModelConfig) -> list[Rule]:
        if cfg.head != "reward":
            return family.rules(cfg)
        backbone = [r for r in family.rules(cfg) if not any(o.startswith("lm_head/") for o in r.ours)]
        return backbone + [linear("score.weight", "score/kernel")]

    return dataclasses.replace(family, config_from_hf=config_from_hf, config_to_hf=config_to_hf, rules=rules)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Registers `family` under its model types (a decoder family converts reward models too)."""
    family = _with_reward_head(family)
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _t in ("llama", "mistral", "qwen2"):
    register(Family(_t, (_t,), "model.", _llama_config, lambda c, _t=_t: _llama_hf(c, _t), _llama_rules,
                    ignored=(r"\.rotary_emb\.inv_freq$",)))
register(Family("gpt2", ("gpt2",), "transformer.", _gpt2_config, _gpt2_hf, _gpt2_rules,
                ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$", r"^lm_head\.weight$")))
register(Family("bloom", ("bloom",), "transformer.", _bloom_config, _bloom_hf, _bloom_rules,
                ignored=(r"^lm_head\.weight$",)))
