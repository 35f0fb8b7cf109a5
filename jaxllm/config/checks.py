"""Validation of a whole config, once, at load: every failure is a ConfigError naming the key and the fix."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from jaxllm.config.schema import (Config, ConfigError, DistillConfig, GenerateConfig, ModelConfig, ObjectiveConfig,
                                  OptimConfig, PreferenceConfig, TrainConfig)

RL_OBJECTIVES = ("grpo", "ppo", "rloo")

log = logging.getLogger("jaxllm")

def validate(cfg: Config) -> None:
    """Checks that do not need devices. Mesh/batch divisibility is checked in `sharding.make_mesh`."""
    m = cfg.model
    _positive(m, "model", ["vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len"])
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.kv_heads} "
            "(each key/value head serves a whole group of query heads)"
        )
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} does not divide by model.num_heads={m.num_heads}; "
            "change one of them or set model.head_dim explicitly"
        )
    if m.positions == "rope" and m.dim_per_head % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got {m.dim_per_head}; change model.head_dim")
    if m.head == "reward" and m.arch != "decoder":
        raise ConfigError(f"model.head=reward is a decoder's scalar head, but model.arch={m.arch}; set model.arch=decoder")
    if m.value_head and (m.arch != "decoder" or m.head != "lm"):
        raise ConfigError(f"model.value_head is a causal LM's PPO value head, but model.arch={m.arch} and "
                          f"model.head={m.head}; set model.arch=decoder and model.head=lm, or model.value_head=false")
    if m.head not in ("lm", "reward") and m.arch != "encoder":
        raise ConfigError(f"model.head={m.head} belongs to encoders; set model.arch=encoder or model.head=lm")
    if m.arch == "encoder" and m.head == "lm":
        raise ConfigError("an encoder needs model.head=mlm (masked LM), discriminator (ELECTRA) or none")
    if m.electra_generator is not None and m.head != "discriminator":
        raise ConfigError("model.electra_generator needs model.head=discriminator (ELECTRA trains a discriminator)")
    if m.sliding_window is not None and m.sliding_window < 1:
        raise ConfigError(f"model.sliding_window must be >= 1 or null, got {m.sliding_window}")
    _validate_model_numbers(m)
    _validate_policies(m)
    d, t = cfg.data, cfg.train
    _positive(d, "data", ["seq_len"])
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if not d.sources:
        raise ConfigError("data.sources is empty; list at least one source (e.g. path: builtin:kjv)")
    for i, s in enumerate(d.sources):
        if s.weight <= 0:
            raise ConfigError(f"data.sources.{i}.weight must be > 0, got {s.weight}")
    for key in ("shuffle_window", "prefetch"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be >= 0 (0 turns it off), got {getattr(d, key)}")
    _validate_objective(d.objective, m.max_seq_len)
    _validate_distill(cfg.distill, d.objective.name)
    _validate_preference(cfg.preference, d.objective.name, d.objective.precomputed_reference)
    _positive(t, "train", ["steps", "batch_size", "grad_accum", "log_every", "sample_tokens"])
    _non_negative(t, "train", {"seed": "", "z_loss": " (0 = off)", "loss_chunk": " (0 = all positions at once)"})
    _non_negative(d, "data", {"seed": ""})
    _validate_optim(cfg.optim, t.steps)
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide into train.grad_accum={t.grad_accum} "
            "micro-batches; pick a batch size that is a multiple of grad_accum"
        )
    if t.spike_threshold < 0 or t.spike_window < 2:
        raise ConfigError("train.spike_threshold must be >= 0 (0 = off) and train.spike_window >= 2")
    _validate_embedding_noise(t)
    _positive(cfg.checkpoint, "checkpoint", ["every", "keep"])
    _positive(cfg.checkpoint, "checkpoint", ["keep_every"], null="no extra checkpoints kept")
    if cfg.eval.every < 0 or cfg.eval.batches < 0:
        raise ConfigError("eval.every and eval.batches must be >= 0 (0 = at the end only / the whole set)")
    if cfg.eval.tasks and (cfg.model.arch != "decoder" or cfg.model.electra_generator is not None):
        raise ConfigError(f"eval.tasks scores lm-evaluation-harness tasks with decoder models, not {cfg.model.arch}; "
                          "remove eval.tasks")
    if cfg.eval.tasks_limit is not None and cfg.eval.tasks_limit <= 0:
        raise ConfigError(f"eval.tasks_limit must be > 0 (examples per task; below 1 a fraction) or null (all), "
                          f"got {cfg.eval.tasks_limit}")
    if cfg.eval.tasks_num_fewshot is not None and cfg.eval.tasks_num_fewshot < 0:
        raise ConfigError(f"eval.tasks_num_fewshot must be >= 0 or null, got {cfg.eval.tasks_num_fewshot}")
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(
            f"mesh sizes (data, fsdp, tensor, expert) = {tuple(sizes)}: each must be >= 1, and at most one -1")
    if cfg.mesh.dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data must be >= 1 (the number of slices), got {cfg.mesh.dcn_data}")
    _positive(cfg.distributed, "distributed", ["timeout_s", "heartbeat_timeout_s"])
    _positive(cfg.distributed, "distributed", ["num_processes"], null="read from JAXLLM_NUM_PROCESSES")
    validate_generate(cfg.generate)
    if d.objective.name in RL_OBJECTIVES:
        _validate_rl(cfg)
    elif cfg.rl.ptx_coef != 0 or cfg.rl.ptx_sources:
        raise ConfigError(f"rl.ptx_coef and rl.ptx_sources mix a pretraining loss into the online objectives (ppo, "
                          f"grpo, rloo), but data.objective.name={d.objective.name}; drop them")
    if cfg.rl.algorithm is not None:
        _validate_algorithm(cfg)


def validate_generate(g: GenerateConfig) -> None:
    """The decoding options alone (`jaxllm generate` flags, or a config's generate section)."""
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError("generate: temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    _positive(g, "generate", ["max_new_tokens", "num_beams", "num_return_sequences"])
    _non_negative(g, "generate", {"seed": "", "no_repeat_ngram_size": " (0 = off)", "min_new_tokens": ""})
    if not (isinstance(g.early_stopping, bool) or g.early_stopping == "never"):
        raise ConfigError(f"generate.early_stopping must be true, false or never, got {g.early_stopping!r}")
    if not math.isfinite(g.length_penalty):
        raise ConfigError(f"generate.length_penalty must be a finite number (1.0 = average log-probability per "
                          f"token, 0 = sum), got {g.length_penalty}")
    _above_zero(g.repetition_penalty, "generate.repetition_penalty", "1.2; 1 = off")
    if g.min_new_tokens > g.max_new_tokens:
        raise ConfigError(f"generate.min_new_tokens={g.min_new_tokens} exceeds max_new_tokens={g.max_new_tokens}; "
                          "lower it or allow more new tokens")
    if not isinstance(g.stop, list) or not all(isinstance(x, str) and x for x in g.stop):
        raise ConfigError(f"generate.stop must be a list of non-empty strings, got {g.stop!r}")
    if g.num_beams > 1:
        if g.temperature > 0:
            raise ConfigError(f"beam search (num_beams={g.num_beams}) is deterministic and does not sample: set "
                              "temperature 0 (--temperature 0, generate.temperature=0), or num_beams 1 to sample")
        if g.num_return_sequences > g.num_beams:
            raise ConfigError(f"num_return_sequences={g.num_return_sequences} exceeds num_beams={g.num_beams}: beam "
                              "search returns at most its beams; raise num_beams or lower num_return_sequences")
    elif g.num_return_sequences > 1 and g.temperature == 0:
        raise ConfigError(f"num_return_sequences={g.num_return_sequences} greedy sequences would all be the same: "
                          "sample (temperature > 0) or use beam search (num_beams >= num_return_sequences)")
    elif g.length_penalty != 1.0 or g.early_stopping is not False:
        raise ConfigError("generate.length_penalty and early_stopping belong to beam search; set num_beams > 1 "
                          "or leave them at their defaults")


def _validate_embedding_noise(t: TrainConfig) -> None:
    if not t.neftune_noise_alpha >= 0:  # also NaN
        raise ConfigError(f"train.neftune_noise_alpha must be >= 0 (0 = off; NEFTune: 5, 10 or 15), got "
                          f"{t.neftune_noise_alpha}")
    a = t.adversarial
    if a is None:
        return
    where = "train.adversarial"
    _above_zero(a.epsilon, f"{where}.epsilon", "1.0, the L2 radius of each row's perturbation")
    _above_zero(a.weight, f"{where}.weight", "1.0; loss = clean + weight * adversarial")
    _positive(a, where, ["steps"])
    if a.step_size is not None:
        _above_zero(a.step_size, f"{where}.step_size", "epsilon / steps, or null for that")


def _validate_model_numbers(m: ModelConfig) -> None:
    """Sizes, scales and epsilons of the model outside their domain (shapes across keys are checked above)."""
    _positive(m, "model", ["num_decoder_layers"], null="model.num_layers")
    _positive(m, "model", ["num_kv_heads"], null="model.num_heads, plain multi-head attention")
    _positive(m, "model", ["head_dim"], null="model.d_model // model.num_heads")
    _positive(m, "model", ["embed_dim"], null="model.d_model, no factorised embeddings")
    _positive(m, "model", ["relative_buckets", "relative_max_distance"])
    _non_negative(m, "model", {"type_vocab_size": " (0 = no token-type embeddings)"})
    for key, example in (("norm_eps", "1e-5"), ("rope_theta", "10000"), ("init_std", "0.02")):
        _above_zero(getattr(m, key), f"model.{key}", example)
    r = m.rope_scaling
    if r is not None:
        for key, example in (("factor", "8"), ("low_freq_factor", "1"), ("high_freq_factor", "4")):
            _above_zero(getattr(r, key), f"model.rope_scaling.{key}", example)
        _positive(r, "model.rope_scaling", ["original_max_position_embeddings"])
        if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
            raise ConfigError(
                f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must be above low_freq_factor="
                f"{r.low_freq_factor} (Llama 3.1: 4 and 1): frequencies between them are interpolated")
    gen = m.electra_generator
    if gen is not None:
        _positive(gen, "model.electra_generator", ["d_model", "num_layers", "num_heads", "mlp_dim"],
                  null="a quarter of the discriminator's width, its depth")
        _non_negative(gen, "model.electra_generator", {"discriminator_weight": " (ELECTRA: 50)"})


def _validate_optim(o: OptimConfig, steps: int) -> None:
    _above_zero(o.lr, "optim.lr", "3e-4; a learning rate <= 0 does not descend")
    _above_zero(o.eps, "optim.eps", "1e-8")
    _non_negative(o, "optim", {"warmup_steps": " (0 = no warmup)", "weight_decay": " (0 = off)"})
    _fraction(o.min_lr_ratio, "optim.min_lr_ratio")
    for key in ("b1", "b2"):
        value = getattr(o, key)
        if not 0 <= value < 1:
            raise ConfigError(f"optim.{key} must be in [0, 1) (AdamW: b1 0.9, b2 0.95), got {value}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be > 0 (e.g. 1.0) or null for no clipping, got {o.grad_clip}")
    if o.warmup_steps >= steps:
        log.warning("optim.warmup_steps=%d is not shorter than train.steps=%d: the warmup is cut to %d steps and "
                    "the learning rate reaches optim.lr only at the last step; lower optim.warmup_steps",
                    o.warmup_steps, steps, max(steps - 1, 0))


def _validate_policies(m: ModelConfig) -> None:
    """Mixture of experts, LoRA and quantisation settings."""
    if m.moe is not None:
        e = m.moe
        where = "model.moe"
        _positive(e, where, ["num_experts", "experts_per_token", "every"])
        if e.experts_per_token > e.num_experts:
            raise ConfigError(f"{where}.experts_per_token={e.experts_per_token} is more than num_experts={e.num_experts}")
        if m.arch != "decoder":
            raise ConfigError(f"{where} is implemented for decoders (model.arch=decoder), not {m.arch}")
        if e.every > 1 and m.share_layers:
            raise ConfigError(f"{where}.every={e.every} needs distinct layers; set model.share_layers=false or every=1")
        if e.every > 1 and m.scan_layers and m.num_layers % e.every:
            raise ConfigError(
                f"model.num_layers={m.num_layers} does not divide into groups of {where}.every={e.every} "
                "(scanned layers repeat one group of `every` layers); change one of them"
            )
        if e.expert_mlp_dim is not None and e.expert_mlp_dim < 1:
            raise ConfigError(f"{where}.expert_mlp_dim must be >= 1 or null (= model.mlp_dim), got {e.expert_mlp_dim}")
        if e.shared_mlp_dim < 0 or (e.shared_gate and not e.shared_mlp_dim):
            raise ConfigError(f"{where}.shared_gate needs a shared expert: set {where}.shared_mlp_dim > 0")
        if e.capacity_factor <= 0:
            raise ConfigError(f"{where}.capacity_factor must be > 0 (1.0 = an even share per expert), got {e.capacity_factor}")
        if e.aux_loss_weight < 0 or e.z_loss_weight < 0:
            raise ConfigError(f"{where}.aux_loss_weight and z_loss_weight must be >= 0")
    if m.lora is not None:
        lo = m.lora
        if lo.rank < 1 or lo.alpha <= 0:
            raise ConfigError(f"model.lora.rank must be >= 1 and alpha > 0, got rank={lo.rank}, alpha={lo.alpha}")
        _fraction(lo.dropout, "model.lora.dropout", high_open=True)
        try:
            re.compile(lo.targets)
        except re.error as err:
            raise ConfigError(f"model.lora.targets {lo.targets!r} is not a regular expression: {err}") from None
    if m.quant is not None and (m.quant.block_size < 2 or m.quant.block_size % 2):
        raise ConfigError(f"model.quant.block_size must be an even number >= 2 (QLoRA: 64), got {m.quant.block_size}")


def _validate_objective(o: ObjectiveConfig, max_seq_len: int) -> None:
    """Ranges only; whether data.seq_len leaves room for an example is checked when the pipeline is built."""
    where = "data.objective"
    _fraction(o.mask_prob, f"{where}.mask_prob", low_open=True)
    _fraction(o.mask_token_prob, f"{where}.mask_token_prob")
    _fraction(o.random_token_prob, f"{where}.random_token_prob")
    if o.mask_token_prob + o.random_token_prob > 1:
        raise ConfigError(
            f"{where}.mask_token_prob + random_token_prob = {o.mask_token_prob + o.random_token_prob} is more "
            "than 1: they share the selected tokens with those kept as they are (BERT: 0.8 + 0.1, 0.1 kept)"
        )
    _span_params(o.noise_density, o.mean_span_length, where)
    for key in ("encoder_len", "decoder_len"):
        value = getattr(o, key)
        if value is not None and not 1 <= value <= max_seq_len:
            raise ConfigError(
                f"{where}.{key}={value} must be between 1 and model.max_seq_len={max_seq_len} (or null for the default)"
            )
    if o.decoder_start_id is not None and o.decoder_start_id < 0:
        raise ConfigError(f"{where}.decoder_start_id must be a token id >= 0 or null, got {o.decoder_start_id}")
    if o.poisson_lambda <= 0:
        raise ConfigError(f"{where}.poisson_lambda must be > 0 (BART: 3), got {o.poisson_lambda}")
    _fraction(o.mask_ratio, f"{where}.mask_ratio", high_open=True)
    if o.name == "ul2" and not o.denoisers:
        raise ConfigError(f"{where}.denoisers is empty; list at least one (see the defaults in jaxllm/config.py)")
    for i, dn in enumerate(o.denoisers):
        if dn.weight <= 0:
            raise ConfigError(f"{where}.denoisers.{i}.weight must be > 0, got {dn.weight}")
        if not dn.mode_token:
            raise ConfigError(f"{where}.denoisers.{i}.mode_token is empty; name a token such as [R], [X] or [S]")
        if dn.kind == "span":
            _span_params(dn.noise_density, dn.mean_span_length, f"{where}.denoisers.{i}")


def _span_params(noise_density: float, mean_span_length: float, where: str) -> None:
    if not 0 < noise_density < 1:
        raise ConfigError(f"{where}.noise_density must be in (0, 1) (T5: 0.15), got {noise_density}")
    if mean_span_length < 1:
        raise ConfigError(f"{where}.mean_span_length must be >= 1 token (T5: 3), got {mean_span_length}")


def _validate_distill(k: DistillConfig, objective: str) -> None:
    if objective == "distill" and not k.teacher:
        raise ConfigError("data.objective.name=distill needs distill.teacher: a jaxllm run directory or checkpoint, "
                          "or a Hugging Face model directory (e.g. distill.teacher=runs/tiny)")
    _fraction(k.beta, "distill.beta (0 = forward KL, 1 = reverse KL, between: generalised JSD)")
    _fraction(k.alpha, "distill.alpha (the weight of the hard-label cross-entropy)")
    _above_zero(k.temperature, "distill.temperature", "1.0")
    _positive(k, "distill", ["vocab"], null="the tokenizer's ids")


def _validate_preference(p: PreferenceConfig, objective: str, precomputed: bool) -> None:
    _above_zero(p.beta, "preference.beta", "0.1")
    if p.loss_type == "robust" and not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"preference.label_smoothing must be in [0, 0.5) for loss_type=robust, got {p.label_smoothing}")
    if p.loss_type == "exo_pair" and not 0 < p.label_smoothing < 1:
        raise ConfigError(f"preference.label_smoothing (EXO's epsilon) must be in (0, 1) for loss_type=exo_pair, got "
                          f"{p.label_smoothing}; the EXO paper uses 1e-3")
    _fraction(p.label_smoothing, "preference.label_smoothing (the share of flipped labels)", high_open=True)
    _non_negative(p, "preference", {"desirable_weight": "", "undesirable_weight": "", "cpo_alpha": " (0 = SimPO)"})
    if precomputed and objective != "dpo":
        raise ConfigError(f"data.objective.precomputed_reference is for dpo (records carrying ref_chosen_logps and "
                          f"ref_rejected_logps); data.objective.name={objective} "
                          + ("pairs records with their KL partners only when batches are made: drop it" if objective
                             == "kto" else "uses no reference: drop it"))
    if objective == "kto" and p.desirable_weight + p.undesirable_weight == 0:
        raise ConfigError("preference.desirable_weight and undesirable_weight are both 0: KTO would learn nothing")


def _validate_rl(cfg: Config) -> None:
    """The rl: section of an online objective (grpo, ppo, rloo); docs/post-training.md."""
    r, name, t = cfg.rl, cfg.data.objective.name, cfg.train
    _positive(r, "rl", ["num_generations", "max_new_tokens", "minibatches", "epochs", "max_rollout_tries",
                        "kl_horizon"])
    if r.eval_samples < 0:
        raise ConfigError(f"rl.eval_samples must be >= 0 (0: greedy held-out reward only), got {r.eval_samples}")
    if not r.rewards:
        raise ConfigError(f"data.objective.name={name} needs rl.rewards: list at least one reward function "
                          "(e.g. rl.rewards=[{function: exact_match}])")
    if name != "ppo" and r.num_generations < 2:
        raise ConfigError(f"{name} compares the rl.num_generations completions of each prompt; set it >= 2 "
                          f"(got {r.num_generations})")
    if t.batch_size % r.num_generations:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of rl.num_generations="
                          f"{r.num_generations}: an update trains on whole groups of one prompt's completions")
    if r.shared_prefix and (t.batch_size // t.grad_accum) % r.num_generations:
        raise ConfigError(f"rl.shared_prefix runs each prompt once for its group: the micro-batch of "
                          f"{t.batch_size // t.grad_accum} (train.batch_size / train.grad_accum) must be a multiple of "
                          f"rl.num_generations={r.num_generations}; change train.grad_accum or set rl.shared_prefix=false")
    if r.shared_prefix and (t.neftune_noise_alpha > 0 or t.adversarial is not None):
        raise ConfigError("train.neftune_noise_alpha and train.adversarial perturb whole rows' embeddings; with online "
                          "RL set rl.shared_prefix=false to use them")
    if cfg.data.seq_len <= r.max_new_tokens:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} leaves no room for a prompt before rl.max_new_tokens="
                          f"{r.max_new_tokens} completion tokens; raise data.seq_len or lower rl.max_new_tokens")
    _above_zero(r.temperature, "rl.temperature", "1.0 (rollouts sample)")
    updates = r.epochs * r.minibatches
    for key, value in (("train.steps", t.steps), ("checkpoint.every", cfg.checkpoint.every)):
        if value % updates:
            raise ConfigError(f"{key}={value} must be a multiple of rl.epochs * rl.minibatches = {updates} (the "
                              "updates one rollout makes): runs stop and save between rollouts")
    for key in ("epsilon", "kl_coef", "vf_coef", "cliprange_value"):
        _non_negative(r, "rl", {key: ""})
    if r.beta is not None and r.beta < 0:
        raise ConfigError(f"rl.beta must be >= 0 (0 = no reference model) or null (TRL's default), got {r.beta}")
    if r.epsilon_high is not None and r.epsilon_high < 0:
        raise ConfigError(f"rl.epsilon_high must be >= 0 or null (= rl.epsilon), got {r.epsilon_high}")
    _fraction(r.gamma, "rl.gamma")
    _fraction(r.lam, "rl.lam")
    if r.kl_target is not None and r.kl_target <= 0:
        raise ConfigError(f"rl.kl_target must be > 0 (adaptive KL) or null (fixed rl.kl_coef), got {r.kl_target}")
    _validate_ptx(r)
    if cfg.data.objective.name == "ppo" and r.dynamic_sampling:
        raise ConfigError("rl.dynamic_sampling drops groups of equal rewards (grpo, rloo); ppo has no groups: drop it")


def _validate_ptx(r) -> None:
    """PPO-ptx: rl.ptx_coef and rl.ptx_sources come together."""
    if not r.ptx_coef >= 0:  # also NaN
        raise ConfigError(f"rl.ptx_coef must be >= 0 (0 = off; the pretraining loss's weight, e.g. 0.5), got "
                          f"{r.ptx_coef}")
    for i, s in enumerate(r.ptx_sources):
        if not s.weight > 0:
            raise ConfigError(f"rl.ptx_sources.{i}.weight must be > 0, got {s.weight}")
    if r.ptx_coef > 0 and not r.ptx_sources:
        raise ConfigError(f"rl.ptx_coef={r.ptx_coef} mixes in a pretraining loss but rl.ptx_sources is empty; list its "
                          "text sources (e.g. rl.ptx_sources=[{path: builtin:kjv}]) or set rl.ptx_coef=0")
    if r.ptx_sources and r.ptx_coef == 0:
        raise ConfigError("rl.ptx_sources would be ignored with rl.ptx_coef=0; set rl.ptx_coef > 0 (e.g. 0.5) to mix "
                          "in their pretraining loss, or drop rl.ptx_sources")


def _validate_algorithm(cfg: Config) -> None:
    """rl.algorithm: ppo, grpo and rloo name the objective; best_of_n runs rounds of sampling and sft."""
    r, name, b = cfg.rl, cfg.data.objective.name, cfg.rl.best_of_n
    if r.algorithm != "best_of_n":
        if name != r.algorithm:
            raise ConfigError(f"rl.algorithm={r.algorithm} trains with data.objective.name={r.algorithm}, but it is "
                              f"{name}; set data.objective.name={r.algorithm} (or drop rl.algorithm)")
        return
    if name != "sft":
        raise ConfigError(f"rl.algorithm=best_of_n fine-tunes on its best samples with the sft objective, but "
                          f"data.objective.name={name}; set data.objective.name=sft")
    if not cfg.train.init_from:
        raise ConfigError("rl.algorithm=best_of_n samples from a trained model; set train.init_from to a run "
                          "directory, checkpoint or Hugging Face model directory")
    if not r.rewards:
        raise ConfigError("rl.algorithm=best_of_n needs rl.rewards: list at least one reward function "
                          "(e.g. rl.rewards=[{function: exact_match}])")
    _positive(r, "rl", ["num_generations", "max_new_tokens"])
    _positive(b, "rl.best_of_n", ["rounds", "prompts_per_round", "sft_steps"])
    _positive(b, "rl.best_of_n", ["sample_batch_size"], null="train.batch_size")
    sample = b.sample_batch_size or cfg.train.batch_size
    if sample % r.num_generations:
        raise ConfigError(f"rl.best_of_n.sample_batch_size (null: train.batch_size) = {sample} must be a multiple of "
                          f"rl.num_generations={r.num_generations}: a sampling call holds whole prompts' samples")
    if b.keep == "threshold" and b.threshold is None:
        raise ConfigError("rl.best_of_n.keep=threshold keeps the completions whose reward is >= "
                          "rl.best_of_n.threshold; set it (e.g. 1.0 for exact_match)")
    if cfg.data.seq_len <= r.max_new_tokens:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} leaves no room for a prompt before rl.max_new_tokens="
                          f"{r.max_new_tokens} completion tokens; raise data.seq_len or lower rl.max_new_tokens")
    if r.temperature < 0:
        raise ConfigError(f"rl.temperature must be >= 0 (0 = greedy, one completion per prompt), got {r.temperature}")


def _fraction(value: float, where: str, low_open: bool = False, high_open: bool = False) -> None:
    if (value <= 0 if low_open else value < 0) or (value >= 1 if high_open else value > 1):
        bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{where} must be in {bounds}, got {value}")


def _positive(section: Any, name: str, keys: list[str], null: str | None = None) -> None:
    """Whole numbers >= 1; with `null` (what null means) the keys may also be null."""
    for key in keys:
        value = getattr(section, key)
        if value is None and null is not None:
            continue
        if value < 1:
            alternative = f" or null (= {null})" if null is not None else ""
            raise ConfigError(f"{name}.{key} must be >= 1{alternative}, got {value}")


def _non_negative(section: Any, name: str, keys: dict[str, str]) -> None:
    """Numbers >= 0; `keys` maps each key to a note on what 0 means (or "")."""
    for key, note in keys.items():
        value = getattr(section, key)
        if value < 0:
            raise ConfigError(f"{name}.{key} must be >= 0{note}, got {value}")


def _above_zero(value: float, where: str, example: str) -> None:
    if not value > 0:  # also NaN
        raise ConfigError(f"{where} must be > 0 (e.g. {example}), got {value}")
