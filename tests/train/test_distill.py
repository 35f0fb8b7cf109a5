"""Knowledge distillation: the divergences against TRL's (values and gradients), the chunked model-level loss
against a direct computation, the loss mask, the tokenizer rule, and a short distillation run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import JaxllmError, ObjectiveConfig, load_config
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.models import bind, model_spec
from jaxllm.train.distill import distill_loss, prepare, same_tokenizer, token_divergence
from jaxllm.train.frozen import FrozenModel
from tests.conftest import random_params, tiny_model_config

# float32 throughout; TRL's torch code and ours sum in different orders.
RTOL, ATOL = 1e-5, 1e-6
CASES = [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 2.0), (0.9, 0.5), (0.0, 2.0), (1.0, 3.0)]


def _logits_and_mask():
    rng = np.random.default_rng(0)
    student = (3 * rng.normal(size=(2, 6, 37))).astype(np.float32)
    teacher = (3 * rng.normal(size=(2, 6, 37))).astype(np.float32)
    mask = np.ones((2, 6), np.float32)
    mask[0, :2] = 0  # a prompt
    mask[1, 4:] = 0  # padding
    return student, teacher, mask


def _ours(student, teacher, mask, beta, temperature):
    def mean_divergence(s):
        div = token_divergence(s, jnp.asarray(teacher), beta, temperature)
        return jnp.sum(div * mask) / jnp.sum(mask)

    value, grad = jax.value_and_grad(mean_divergence)(jnp.asarray(student))
    return float(value), np.asarray(grad)


@pytest.mark.parametrize("beta,temperature", CASES)
def test_divergences_equal_trls_in_value_and_gradient(beta, temperature):
    """GKD's `generalized_jsd_loss` (labels -100 where masked, "batchmean" = per-token mean) and the
    DistillationTrainer's `_chunked_divergence_loss` (an identity lm_head makes its hidden states the logits)."""
    torch = pytest.importorskip("torch")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    student, teacher, mask = _logits_and_mask()
    value, grad = _ours(student, teacher, mask, beta, temperature)

    s = torch.tensor(student, requires_grad=True)
    labels = torch.where(torch.tensor(mask) > 0, 0, -100)
    gkd = GKDTrainer.generalized_jsd_loss(s, torch.tensor(teacher), labels, beta=beta, temperature=temperature)
    gkd.backward()
    np.testing.assert_allclose(value, gkd.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=RTOL, atol=ATOL)

    h = torch.tensor(student, requires_grad=True)
    eye = torch.eye(student.shape[-1])
    chunked, _, _ = _chunked_divergence_loss(h, torch.tensor(teacher), eye, eye, torch.tensor(mask), beta,
                                             temperature=temperature)
    chunked.backward()
    np.testing.assert_allclose(value, chunked.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, h.grad.numpy(), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------ the model-level loss

STUDENT = tiny_model_config(vocab_size=101, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=48)
TEACHER = tiny_model_config(vocab_size=112, d_model=64, num_layers=3)  # padded wider: compared over 100 ids


def _setup(alpha=0.3, beta=0.5, temperature=2.0, chunk=0, teacher_cfg=TEACHER, student_seed=1):
    cfg = load_config(None, ["data.objective.name=distill", "distill.teacher=unused", f"distill.alpha={alpha}",
                             f"distill.beta={beta}", f"distill.temperature={temperature}", "distill.vocab=100",
                             f"train.loss_chunk={chunk}", "train.z_loss=0"])
    student = (model_spec(STUDENT)[0], random_params(STUDENT, seed=student_seed, std=0.3))
    teacher = FrozenModel(random_params(teacher_cfg, seed=2, std=0.3), model_spec(teacher_cfg)[0], teacher_cfg)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 100, size=(2, 11))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(10), (2, 1)),
             "segment_ids": np.ones((2, 10), np.int32), "loss_mask": np.ones((2, 10), np.float32)}
    batch["segment_ids"][1, 6:] = 2  # two documents packed in row 1
    batch["positions"][1, 6:] = np.arange(4)
    batch["loss_mask"][0, :3] = 0  # a prompt: no loss there
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    norms = {"tokens": jnp.sum(batch["loss_mask"]), "positions": jnp.float32(20)}
    return cfg, student, teacher, batch, norms


def _jitted_loss(cfg, graphdef):
    """(params, teacher, batch, norms) -> ((objective, metrics), gradients), jitted."""
    return jax.jit(jax.value_and_grad(
        lambda p, t, b, n: distill_loss(p, graphdef, b, n, None, {"teacher": t}, cfg), has_aux=True))


def _loss(cfg, student, teacher, batch, norms):
    return _jitted_loss(cfg, student[0])(student[1], teacher, batch, norms)


def test_the_loss_is_the_mixture_of_masked_mean_divergence_and_cross_entropy_whole_or_in_chunks():
    cfg, student, teacher, batch, norms = _setup()
    (objective, metrics), grads = _loss(cfg, student, teacher, batch, norms)
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    logits_s = jax.jit(lambda p: bind(student[0], p)(*inputs)[0])(student[1])
    logits_t = jax.jit(lambda t: t.bind()(*inputs)[0])(teacher)
    mask = np.asarray(batch["loss_mask"])
    div = np.asarray(token_divergence(logits_s[..., :100], logits_t[..., :100], 0.5, 2.0))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_s)), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    expected_div, expected_ce = (div * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["distill_loss"], expected_div, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_loss"], expected_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], 0.7 * expected_div + 0.3 * expected_ce, rtol=1e-5)
    np.testing.assert_allclose(objective, metrics["loss"], rtol=1e-6)
    # Evaluation sums the student's cross-entropy (comparable with a clm run's held-out loss).
    from jaxllm.train.step import eval_step

    held_out = jax.jit(lambda p, t: eval_step(p, batch, {"teacher": t}, graphdef=student[0], loss=lambda *a: distill_loss(*a, cfg)))(
        student[1], teacher)
    np.testing.assert_allclose(held_out["nll_sum"], expected_ce * mask.sum(), rtol=1e-5)

    # 3 positions at a time (3 does not divide 10): the same loss and gradients.
    chunked = _jitted_loss(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=3)), student[0])
    (part, _), part_grads = chunked(student[1], teacher, batch, norms)
    np.testing.assert_allclose(part, objective, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), part_grads, grads)
    # Other targets where the mask is 0 change nothing.
    (again, _), _ = chunked(student[1], teacher, dict(batch, targets=batch["targets"].at[0, :3].set(7)), norms)
    np.testing.assert_allclose(again, objective, rtol=1e-6)


# ------------------------------------------------------------------------------------------ the tokenizer rule


def _hf_teacher(directory, tokenizer_file=None):
    """A Hugging Face directory as a teacher: config.json, and the bundled SentencePiece model or a tokenizer.json."""
    from jaxllm.data.tokenizer import ASSETS

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4160, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu"}))
    if tokenizer_file is None:
        (directory / "tokenizer.model").write_bytes((ASSETS / "kjv-sp4k.model").read_bytes())
    else:
        (directory / "tokenizer.json").write_text(tokenizer_file)
    return directory


def test_the_teachers_tokenizer_must_be_the_students_and_the_compared_ids_are_the_tokenizers(tmp_path):
    student_tokenizer = load_tokenizer("builtin:kjv-sp4k")
    cfg = load_config(None, ["data.objective.name=distill", f"distill.teacher={_hf_teacher(tmp_path / 'same')}",
                             "model.vocab_size=4224", "data.seq_len=128"])
    assert prepare(cfg, student_tokenizer).distill.vocab == student_tokenizer.vocab_size  # not 4160 or 4224

    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordLevel({"[UNK]": 0, "in": 1, "the": 2, "beginning": 3}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    different = _hf_teacher(tmp_path / "other", other.to_str())
    assert not same_tokenizer(load_tokenizer(str(different)), student_tokenizer)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(different)))
    with pytest.raises(JaxllmError, match=f"distill.teacher={different} uses tokenizer .* but the student .*kjv-sp4k"):
        prepare(cfg, student_tokenizer)
    wide = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(tmp_path / "same"), vocab=4200))
    with pytest.raises(JaxllmError, match="distill.vocab=4200 ids are compared but .* the teacher 4160"):
        prepare(wide, student_tokenizer)
    long = dataclasses.replace(wide, data=dataclasses.replace(cfg.data, seq_len=256),
                               distill=dataclasses.replace(wide.distill, vocab=None))
    with pytest.raises(JaxllmError, match="reads at most 128 tokens but data.seq_len is 256"):
        prepare(long, student_tokenizer)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(tmp_path / "missing")))
    with pytest.raises(JaxllmError, match="missing does not exist"):
        prepare(cfg, student_tokenizer)


def test_a_distill_config_without_a_teacher_is_a_config_error():
    with pytest.raises(JaxllmError, match="needs distill.teacher"):
        load_config(None, ["data.objective.name=distill"])
    with pytest.raises(JaxllmError, match=r"distill.beta .* must be in \[0, 1\]"):
        load_config(None, ["distill.beta=1.5"])
    with pytest.raises(JaxllmError, match=r"distill.alpha .* must be in \[0, 1\], got -0.1"):
        load_config(None, ["distill.alpha=-0.1"])
    with pytest.raises(JaxllmError, match="distill.temperature must be > 0"):
        load_config(None, ["distill.temperature=0"])


# ------------------------------------------------------------------------------------------ a short run


def test_a_student_distils_from_a_hugging_face_teacher_through_the_trainer(tmp_path):
    """A wider teacher (a Hugging Face directory with the bundled tokenizer, read in bf16) and a smaller
    student: the trainer checks the tokenizer, compares the tokenizer's ids and logs the mixture's parts."""
    from jaxllm.convert.hf import save_hf
    from jaxllm.train.loop import Trainer
    from tests.train.test_loop import micro_config

    teacher_cfg = tiny_model_config(family="llama", vocab_size=4160, d_model=48, num_heads=4, num_kv_heads=2)
    save_hf(random_params(teacher_cfg), teacher_cfg, tmp_path / "teacher", load_tokenizer("builtin:kjv-sp4k").files())
    cfg = micro_config(tmp_path / "student", "data.objective.name=distill", f"distill.teacher={tmp_path / 'teacher'}",
                       "distill.teacher_dtype=bfloat16", "distill.alpha=0.5", "train.steps=2", "train.loss_chunk=16",
                       "optim.warmup_steps=1")
    assert cfg.data.objective == ObjectiveConfig(name="distill")
    trainer = Trainer(cfg)
    try:
        assert trainer.cfg.distill.vocab == trainer.tokenizer.vocab_size == 4096  # not the teacher's 4160
        assert {a.dtype for a in jax.tree.leaves(trainer.frozen["teacher"].params)} == {jnp.dtype(jnp.bfloat16)}
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["end_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "distill_loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["distill_loss"] > 0 and r["ce_loss"] > 5  # an untrained student on 4096 ids
        np.testing.assert_allclose(r["loss"], 0.5 * r["distill_loss"] + 0.5 * r["ce_loss"], rtol=1e-5)
