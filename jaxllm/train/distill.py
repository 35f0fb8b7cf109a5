"""Knowledge distillation (`data.objective.name: distill`, the `distill:` section): a student decoder learns
a frozen teacher's next-token distributions, optionally mixed with the data's own next tokens.

The divergence is TRL's generalised Jensen-Shannon divergence (GKD, arXiv 2306.13649; TRL's
`GKDTrainer.generalized_jsd_loss` and `DistillationTrainer`), at temperature T on both models' logits:

    p_s = softmax(z_s / T), p_t = softmax(z_t / T)
    beta = 0:  KL(p_t || p_s)                     (forward KL)
    beta = 1:  KL(p_s || p_t)                     (reverse KL)
    else:      beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = (1 - beta) * p_s + beta * p_t

summed over the positions the batch's `loss_mask` selects and divided by their count (TRL's per-token
"batchmean" with labels, `sum / num_items_in_batch`); no T^2 factor, as TRL. The objective is
(1 - alpha) * divergence + alpha * cross-entropy (+ z-loss and MoE terms as in pretraining).

Memory: both models' hidden states [B, L, D] are computed once; their [B, chunk, V] logits exist only for
`train.loss_chunk` positions at a time (`losses.chunked_sums`), so memory does not grow with B x L x V.
Differently padded vocabularies are compared over the first `distill.vocab` ids: the tokenizer's real ids
(`prepare` sets it at startup, after checking that the teacher's tokenizer is the student's).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm.config import Config, JaxllmError, ModelConfig
from jaxllm.data.objectives import extra_token_count
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.models import bind
from jaxllm.models.moe import moe_objective
from jaxllm.train.checkpoint import find_checkpoint
from jaxllm.train.frozen import FrozenSource
from jaxllm.train.losses import chunked_sums, cross_entropy, loss_mask
from jaxllm.train.objective import Objective, register


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, beta: float,
                     temperature: float = 1.0) -> jax.Array:
    """The generalised JSD (module docstring) of each position: logits [..., V] -> [...] float32."""
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)

    def kl(log_p, log_q):  # KL(p || q); p log p is 0 where p underflows to 0
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

    if beta == 0:
        return kl(log_pt, log_ps)
    if beta == 1:
        return kl(log_ps, log_pt)
    log_m = jnp.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
    return beta * kl(log_pt, log_m) + (1 - beta) * kl(log_ps, log_m)


def divergence_and_cross_entropy(xs_BLD: jax.Array, student_head, xt_BLE: jax.Array, teacher_head,
                                 targets_BL: jax.Array, mask_BL: jax.Array, *, beta: float, temperature: float,
                                 vocab: int, z_loss: float = 0.0, chunk: int = 0):
    """Sums over the masked positions of (divergence, student cross-entropy, z-loss), from the two models'
    hidden states and output projections (`head(x) -> logits`), `chunk` positions at a time. The
    divergence compares the first `vocab` ids of both models' logits; the cross-entropy uses all of the
    student's."""

    def piece(xs_BCD, xt_BCE, t_BC, m_BC):
        logits_s, logits_t = student_head(xs_BCD), teacher_head(xt_BCE)
        div_BC = token_divergence(logits_s[..., :vocab], logits_t[..., :vocab], beta, temperature)
        nll, zl = cross_entropy(logits_s, t_BC, m_BC, z_loss)
        return jnp.sum(jnp.where(m_BC > 0, div_BC, 0.0) * m_BC), nll, zl

    return chunked_sums(piece, (xs_BLD, xt_BLE, targets_BL, mask_BL.astype(jnp.float32)), chunk)


def distill_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """The objective (see objective.Loss): `frozen["teacher"]` scores the batch the student reads."""
    student, teacher, k = bind(graphdef, params), frozen["teacher"].bind(), cfg.distill
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    xs_BLD, _, moe_aux = student.hidden(*inputs)
    xt_BLE, _, _ = teacher.hidden(*inputs)
    vocab = k.vocab or min(student.cfg.vocab_size, teacher.cfg.vocab_size)
    div, nll, zl = divergence_and_cross_entropy(
        xs_BLD, student.logits, jax.lax.stop_gradient(xt_BLE), teacher.logits, batch["targets"], loss_mask(batch),
        beta=k.beta, temperature=k.temperature, vocab=vocab, z_loss=cfg.train.z_loss, chunk=cfg.train.loss_chunk)
    div, ce = div / norms["tokens"], nll / norms["tokens"]
    loss = (1 - k.alpha) * div + k.alpha * ce
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, student.cfg)
    return loss + zl / norms["tokens"] + moe_loss, {"loss": loss, "distill_loss": div, "ce_loss": ce, **moe_metrics}


# ------------------------------------------------------------------------------------------ startup


def teacher_tokenizer(path: str) -> tuple[Tokenizer, ModelConfig]:
    """(tokenizer, model config) of a teacher: a jaxllm run or checkpoint (the tokenizer its
    checkpoint carries) or a Hugging Face model directory (its tokenizer files), read without its weights."""
    p = Path(path)
    if (p / "config.json").is_file():
        from jaxllm.convert.hf import config_from_hf
        from jaxllm.convert.hf_io import read_hf_config

        return load_tokenizer(str(p)), config_from_hf(read_hf_config(p))
    if not p.exists():
        raise JaxllmError(f"distill.teacher={path} does not exist; give a jaxllm run directory or checkpoint "
                          "(e.g. runs/tiny after `jaxllm train configs/tiny.yaml`) or a Hugging Face model directory")
    checkpointer, step = find_checkpoint(p)
    meta = checkpointer.restore_meta(step, with_data=False)
    if meta.tokenizer_files:
        tokenizer = load_tokenizer_from_files(meta.tokenizer_files)
    elif meta.config.tokenizer.path:
        tokenizer = load_tokenizer(meta.config.tokenizer.path)
    else:
        raise JaxllmError(f"distill.teacher={path} carries no tokenizer; the teacher must be a run trained with "
                          "the student's tokenizer")
    return tokenizer, meta.config.model


PROBE = ("In the beginning God created the heaven and the earth. 1234567890 (x+y)^2 = z; "
         "naïve café, Größe, ñandú, 東京, Привет, 🙂\n\tdef f(x): return x")


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Identical files, or the same vocabulary size, special ids and ids for a probe text of many scripts."""
    if a.files() == b.files():
        return True
    return (a.vocab_size, a.bos_id, a.eos_id, a.encode(PROBE)) == (b.vocab_size, b.bos_id, b.eos_id, b.encode(PROBE))


def prepare(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Checks the teacher (a decoder with the student's tokenizer, as long a context, wide enough) and sets
    `distill.vocab`
    (null: the ids the data can hold, i.e. the tokenizer's) so the two models compare the same ids."""
    k = cfg.distill
    theirs, teacher = teacher_tokenizer(k.teacher)
    if teacher.arch != "decoder":
        raise JaxllmError(f"distill.teacher={k.teacher} is a model.arch={teacher.arch}; distillation needs a decoder "
                          "teacher")
    if teacher.max_seq_len < cfg.data.seq_len:
        raise JaxllmError(f"distill.teacher={k.teacher} reads at most {teacher.max_seq_len} tokens but data.seq_len is "
                          f"{cfg.data.seq_len}; lower data.seq_len to the teacher's context")
    if not same_tokenizer(theirs, tokenizer):
        raise JaxllmError(
            f"distill.teacher={k.teacher} uses tokenizer {theirs.name} ({theirs.vocab_size} ids) but the student "
            f"{tokenizer.name} ({tokenizer.vocab_size} ids); distillation compares token ids, so set "
            f"tokenizer.path to the teacher's tokenizer")
    vocab = k.vocab or tokenizer.vocab_size + extra_token_count(cfg.data, tokenizer)
    if vocab > min(cfg.model.vocab_size, teacher.vocab_size):
        raise JaxllmError(
            f"distill.vocab={vocab} ids are compared but the student has model.vocab_size={cfg.model.vocab_size} "
            f"and the teacher {teacher.vocab_size}; lower distill.vocab or widen the student")
    return dataclasses.replace(cfg, distill=dataclasses.replace(k, vocab=vocab))


def _teacher(cfg: Config) -> dict[str, FrozenSource]:
    return {"teacher": FrozenSource(cfg.distill.teacher, cfg.distill.teacher_dtype)}


register(Objective("distill", ("decoder",), distill_loss, frozen_models=_teacher, prepare=prepare))
