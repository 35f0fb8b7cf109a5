"""Encoder (BERT, RoBERTa, ALBERT, ELECTRA) and encoder-decoder (T5, BART) families."""

from __future__ import annotations

from jaxllm.config import ModelConfig
from jaxllm.convert.families import ACT_NAMES, Family, _activation, _require, register
from jaxllm.convert.hf_io import ConversionError
from jaxllm.convert.rules import Rule, copy, linear

# --------------------------------------------------------------------------- BERT-like encoders

HEADS = {  # architectures[0] suffix -> our encoder head
    "ForMaskedLM": "mlm", "ForPreTraining": "discriminator", "Model": "none",
}


def _head(hf: dict, family: str) -> str:
    arch = (hf.get("architectures") or [f"{family}ForMaskedLM"])[0]
    for suffix, head in HEADS.items():
        if arch.endswith(suffix):
            if family == "Bert" and head == "discriminator":
                break  # BertForPreTraining has NSP; not an ELECTRA discriminator
            return head
    raise ConversionError(f"architecture {arch!r} is not supported; jaxllm converts {family}ForMaskedLM and {family}Model")


def _encoder_config(hf: dict, family: str) -> ModelConfig:
    _require(hf, "position_embedding_type", ("absolute", None))
    offset = 2 if family == "Roberta" else 0
    if family == "Albert" and (hf.get("num_hidden_groups", 1) != 1 or hf.get("inner_group_num", 1) != 1):
        raise ConversionError("ALBERT with num_hidden_groups or inner_group_num != 1 is not supported")
    embedding_size = hf.get("embedding_size") if family in ("Albert", "Electra") else None
    return ModelConfig(
        arch="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"] - offset, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post", mlp=_activation(hf, "hidden_act"), positions="learned", attention_bias=True,
        output_bias=True, embed_dim=embedding_size if embedding_size != hf["hidden_size"] else None, embed_norm=True,
        type_vocab_size=hf.get("type_vocab_size", 2), share_layers=family == "Albert", head=_head(hf, family),
        tie_embeddings=True, logits_bias=True,
    )


def _encoder_hf(cfg: ModelConfig, family: str) -> dict:
    offset = 2 if family == "Roberta" else 0
    arch = {"mlm": "ForMaskedLM", "discriminator": "ForPreTraining", "none": "Model"}[cfg.head]
    out = {
        "model_type": family.lower(), "architectures": [family + arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": ACT_NAMES[cfg.mlp],
        "max_position_embeddings": cfg.max_seq_len + offset, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }
    if family in ("Albert", "Electra"):
        out["embedding_size"] = cfg.embedding_dim
    if family == "Roberta":
        out.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return out


def _encoder_rules(cfg: ModelConfig, family: str) -> list[Rule]:
    base = {"Bert": "bert.", "Roberta": "roberta.", "Albert": "albert.", "Electra": "electra."}[family]
    e = f"{base}embeddings."
    positions = (
        Rule(f"{e}position_embeddings.weight", ("embeddings/positions/embedding",), "offset", 0, offset=2)
        if family == "Roberta"
        else copy(f"{e}position_embeddings.weight", "embeddings/positions/embedding")
    )
    rules = [
        copy(f"{e}word_embeddings.weight", "embed/embedding"), positions,
        copy(f"{e}token_type_embeddings.weight", "embeddings/token_types"),
        copy(f"{e}LayerNorm.weight", "embeddings/norm/scale"), copy(f"{e}LayerNorm.bias", "embeddings/norm/bias"),
    ]
    if cfg.embed_dim:
        project = f"{base}encoder.embedding_hidden_mapping_in" if family == "Albert" else f"{base}embeddings_project"
        rules += [linear(f"{project}.weight", "embeddings/project/kernel"), copy(f"{project}.bias", "embeddings/project/bias")]
    if family == "Albert":
        p = f"{base}encoder.albert_layer_groups.0.albert_layers.0."
        names = {"q": "attention.query", "k": "attention.key", "v": "attention.value", "o": "attention.dense",
                 "attn_norm": "attention.LayerNorm", "up": "ffn", "down": "ffn_output", "mlp_norm": "full_layer_layer_norm"}
    else:
        p = f"{base}encoder.layer.{{i}}."
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm", "up": "intermediate.dense",
                 "down": "output.dense", "mlp_norm": "output.LayerNorm"}
    for ours in "qkvo":
        rules.append(linear(f"{p}{names[ours]}.weight", f"layers/attn/{ours}/kernel", n_in=2 if ours == "o" else 1))
        rules.append(copy(f"{p}{names[ours]}.bias", f"layers/attn/{ours}/bias"))
    for ours in ("up", "down"):
        rules += [linear(f"{p}{names[ours]}.weight", f"layers/mlp/{ours}/kernel"), copy(f"{p}{names[ours]}.bias", f"layers/mlp/{ours}/bias")]
    for ours in ("attn_norm", "mlp_norm"):
        rules += [copy(f"{p}{names[ours]}.weight", f"layers/{ours}/scale"), copy(f"{p}{names[ours]}.bias", f"layers/{ours}/bias")]
    if cfg.head == "mlm":
        head = {"Bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
                "Roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                "Albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
                "Electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias")}[family]
        rules += [linear(f"{head[0]}.weight", "mlm_head/dense/kernel"), copy(f"{head[0]}.bias", "mlm_head/dense/bias"),
                  copy(f"{head[1]}.weight", "mlm_head/norm/scale"), copy(f"{head[1]}.bias", "mlm_head/norm/bias"),
                  copy(head[2], "mlm_head/out/bias")]
    elif cfg.head == "discriminator":
        d = "discriminator_predictions."
        rules += [linear(f"{d}dense.weight", "disc_head/dense/kernel"), copy(f"{d}dense.bias", "disc_head/dense/bias"),
                  linear(f"{d}dense_prediction.weight", "disc_head/out/kernel"),
                  copy(f"{d}dense_prediction.bias", "disc_head/out/bias")]
    return rules


_TIED_DECODERS = (r"^cls\.predictions\.decoder\.(weight|bias)$", r"^lm_head\.decoder\.(weight|bias)$",
                  r"^predictions\.decoder\.(weight|bias)$", r"^generator_lm_head\.weight$", r"\.position_ids$",
                  r"^(bert|roberta)\.pooler\.", r"^pooler\.")
for _family in ("Bert", "Roberta", "Albert", "Electra"):
    register(Family(
        _family.lower(), (_family.lower(),), {"Bert": "bert.", "Roberta": "roberta.", "Albert": "albert.",
                                              "Electra": "electra."}[_family],
        lambda hf, f=_family: _encoder_config(hf, f), lambda c, f=_family: _encoder_hf(c, f),
        lambda c, f=_family: _encoder_rules(c, f), ignored=_TIED_DECODERS,
    ))


# --------------------------------------------------------------------------- T5 (v1.0 and v1.1)

T5_FFN = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}


def _t5_config(hf: dict) -> ModelConfig:
    ffn = _require(hf, "feed_forward_proj", tuple(T5_FFN))
    # transformers 5 always ties (a separate lm_head.weight in the checkpoint unties it, see
    # hf.config_from_hf) and says whether to scale in `scale_decoder_outputs`; older configs tie and
    # scale together (T5 v1.0) or neither (v1.1).
    tied = bool(hf.get("tie_word_embeddings", True))
    scale = bool(hf.get("scale_decoder_outputs", tied))
    return ModelConfig(
        arch="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], num_heads=hf["num_heads"],
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], max_seq_len=hf.get("n_positions", 512), mlp=T5_FFN[ffn],
        norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), positions="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), scale_attention=False,
        tie_embeddings=tied, scale_decoder_output=scale,
    )


def _t5_hf(cfg: ModelConfig) -> dict:
    ffn = {v: k for k, v in T5_FFN.items()}[cfg.mlp]
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.dim_per_head, "d_ff": cfg.mlp_dim, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads, "feed_forward_proj": ffn,
        "is_gated_act": ffn.startswith("gated"), "dense_act_fn": {"relu": "relu", "geglu": "gelu_new", "swiglu": "silu"}[cfg.mlp],
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_decoder_output,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        "is_encoder_decoder": True,
    }


def _t5_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [copy("shared.weight", "embed/embedding")]
    gated = cfg.mlp in ("geglu", "swiglu")
    for stack in ("encoder", "decoder"):
        b = f"{stack}.block.{{i}}.layer."
        mlp_layer = 2 if stack == "decoder" else 1
        attentions = [("0.SelfAttention", "attn", "0.layer_norm", "attn_norm")]
        if stack == "decoder":
            attentions.append(("1.EncDecAttention", "cross", "1.layer_norm", "cross_norm"))
        for hf_name, ours, hf_norm, ours_norm in attentions:
            for n in "qkvo":
                rules.append(linear(f"{b}{hf_name}.{n}.weight", f"{stack}/layers/{ours}/{n}/kernel", n_in=2 if n == "o" else 1))
            rules.append(copy(f"{b}{hf_norm}.weight", f"{stack}/layers/{ours_norm}/scale"))
        ffn = f"{b}{mlp_layer}.DenseReluDense."
        if gated:
            rules += [linear(f"{ffn}wi_0.weight", f"{stack}/layers/mlp/gate/kernel"),
                      linear(f"{ffn}wi_1.weight", f"{stack}/layers/mlp/up/kernel")]
        else:
            rules.append(linear(f"{ffn}wi.weight", f"{stack}/layers/mlp/up/kernel"))
        rules += [
            linear(f"{ffn}wo.weight", f"{stack}/layers/mlp/down/kernel"),
            copy(f"{b}{mlp_layer}.layer_norm.weight", f"{stack}/layers/mlp_norm/scale"),
            copy(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}/relative_bias/embedding"),
            copy(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale"),
        ]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.weight", "lm_head/kernel"))
    return rules


# --------------------------------------------------------------------------- BART


def _bart_config(hf: dict) -> ModelConfig:
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise ConversionError("pre-norm BART variants (mBART: normalize_before / add_final_layer_norm) are not supported")
    for key in ("decoder_attention_heads", "decoder_ffn_dim"):
        if hf[key] != hf[key.replace("decoder", "encoder")]:
            raise ConversionError(f"BART with {key} != its encoder counterpart is not supported")
    return ModelConfig(
        arch="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"], num_heads=hf["encoder_attention_heads"], mlp_dim=hf["encoder_ffn_dim"],
        max_seq_len=hf["max_position_embeddings"], mlp=_activation(hf, "activation_function"), norm="layernorm",
        norm_eps=1e-5, norm_position="post", positions="learned", attention_bias=True, output_bias=True,
        embed_norm=True, embed_scale=bool(hf.get("scale_embedding")), tie_embeddings=True, logits_bias=True,
    )


def _bart_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "bart", "architectures": ["BartForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "encoder_layers": cfg.num_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.mlp_dim, "decoder_ffn_dim": cfg.mlp_dim, "activation_function": ACT_NAMES[cfg.mlp],
        "max_position_embeddings": cfg.max_seq_len, "scale_embedding": cfg.embed_scale, "tie_word_embeddings": True,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2, "is_encoder_decoder": True,
    }


def _bart_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [copy("model.shared.weight", "embed/embedding"), Rule("final_logits_bias", ("lm_head/bias",), "row", 0)]
    for stack in ("encoder", "decoder"):
        s = f"model.{stack}."
        rules += [
            Rule(f"{s}embed_positions.weight", (f"{stack}/embeddings/positions/embedding",), "offset", 0, offset=2),
            copy(f"{s}layernorm_embedding.weight", f"{stack}/embeddings/norm/scale"),
            copy(f"{s}layernorm_embedding.bias", f"{stack}/embeddings/norm/bias"),
        ]
        p = f"{s}layers.{{i}}."
        attentions = [("self_attn", "attn")] + ([("encoder_attn", "cross")] if stack == "decoder" else [])
        for hf_name, ours in attentions:
            for hf_proj, n in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
                rules += [linear(f"{p}{hf_name}.{hf_proj}.weight", f"{stack}/layers/{ours}/{n}/kernel", n_in=2 if n == "o" else 1),
                          copy(f"{p}{hf_name}.{hf_proj}.bias", f"{stack}/layers/{ours}/{n}/bias")]
            norm = f"{stack}/layers/{'attn_norm' if ours == 'attn' else 'cross_norm'}"
            rules += [copy(f"{p}{hf_name}_layer_norm.weight", f"{norm}/scale"), copy(f"{p}{hf_name}_layer_norm.bias", f"{norm}/bias")]
        rules += [linear(f"{p}fc1.weight", f"{stack}/layers/mlp/up/kernel"), copy(f"{p}fc1.bias", f"{stack}/layers/mlp/up/bias"),
                  linear(f"{p}fc2.weight", f"{stack}/layers/mlp/down/kernel"), copy(f"{p}fc2.bias", f"{stack}/layers/mlp/down/bias"),
                  copy(f"{p}final_layer_norm.weight", f"{stack}/layers/mlp_norm/scale"),
                  copy(f"{p}final_layer_norm.bias", f"{stack}/layers/mlp_norm/bias")]
    return rules


register(Family("t5", ("t5",), "", _t5_config, _t5_hf, _t5_rules,
                ignored=(r"^(encoder|decoder)\.embed_tokens\.weight$",)))
register(Family("bart", ("bart",), "model.", _bart_config, _bart_hf, _bart_rules,
                ignored=(r"^model\.(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$")))
