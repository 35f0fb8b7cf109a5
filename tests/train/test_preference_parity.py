"""End-to-end parity of the preference objectives with TRL 1.16's trainers: the same tiny random `transformers`
Llama (converted with `from_hf`), the same pairs, the same reference; our objective's loss, TRL's metrics and
the gradient of every weight against TRL's `compute_loss` (DPOTrainer per loss type, KTOTrainer) and its
`get_batch_loss_metrics` (ORPOTrainer, CPOTrainer with loss_type=simpo), in float32.

Our side builds the preference rows by hand with the documented layout (jaxllm/data/preference.py): each
pair's two sequences side by side in a row, whole (unshifted), targets the next token, the loss mask on the
response's targets; TRL's side gets the same token ids through its own collators (pre-tokenized, no text).
Tolerances: loss and metrics rtol 1e-5; each weight's gradient max |ours - TRL's| <= 1e-5 * max |TRL's|
(measured: at most 1.6e-6 relative, gradients 1.3e-6).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

from jaxllm import from_hf
from jaxllm.config import Config, DataConfig, ObjectiveConfig, PreferenceConfig
from jaxllm.convert.hf import save_hf
from jaxllm.train import preference
from jaxllm.train.frozen import FrozenModel
from jaxllm.train.losses import normalizers

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

V, EOS, PAD = 61, 1, 0
RTOL = 1e-5
# Pre-tokenized pairs (EOS ending each response, as TRL's preprocessing adds it); lengths differ on purpose.
PAIRS = [
    {"prompt_ids": [5, 9, 14], "chosen_ids": [20, 7, 33, 40, EOS], "rejected_ids": [41, EOS]},
    {"prompt_ids": [8], "chosen_ids": [12, EOS], "rejected_ids": [50, 51, 52, EOS]},
    {"prompt_ids": [3, 4, 6, 2], "chosen_ids": [18, 19, EOS], "rejected_ids": [25, 26, 27, 28, 29, EOS]},
]
ROWS = [[0, 1], [2]]  # which pairs each row of our batch packs
LENGTH = 24
KTO = [  # KTO examples; each KL sequence is its prompt with the previous example's completion (TRL's rotation)
    {"prompt_ids": [5, 9, 14], "completion_ids": [20, 7, 33, EOS], "label": True},
    {"prompt_ids": [8], "completion_ids": [50, 51, EOS], "label": False},
    {"prompt_ids": [3, 4, 6, 2], "completion_ids": [18, EOS], "label": True},
    {"prompt_ids": [11, 13], "completion_ids": [25, 26, 27, 28, EOS], "label": False},
]
for i, example in enumerate(KTO):
    example["KL_completion_ids"] = KTO[i - 1]["completion_ids"]


# ------------------------------------------------------------------------------------------ models


def _llama(seed: int):
    config = T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial values everywhere (norm scales, large enough logits)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy dir, reference dir): two different random Llamas saved as Hugging Face directories, and both
    converted by `from_hf` (on one device: nothing here is about sharding)."""
    dirs = []
    for seed in (0, 1):
        directory = tmp_path_factory.mktemp(f"llama{seed}")
        _llama(seed).save_pretrained(directory, safe_serialization=True)
        dirs.append(directory)
    return dirs, [from_hf(d, devices=jax.devices()[:1]) for d in dirs]


def _tokenizer():
    """A word-level tokenizer over ids 0..V-1 (`tI` is id I): TRL's trainers need one; the data is token ids."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers

    rust = Tokenizer(tk_models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=rust, pad_token=f"t{PAD}", eos_token=f"t{EOS}")


def _hf(directory):
    return T.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager").train()


def _trl_grads(model) -> dict[str, np.ndarray]:
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ our side


def _rows(rows: list[list[tuple[list[int], int, float]]]) -> dict[str, np.ndarray]:
    """Preference rows from (ids, prompt length, label) sequences, segments 1, 2, ... in each row's order."""
    B = len(rows)
    batch = {k: np.zeros((B, LENGTH), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((B, LENGTH), np.float32)
    batch["kto_label"] = np.zeros((B, LENGTH), np.float32)
    for b, sequences in enumerate(rows):
        at = 0
        for s, (ids, prompt, label) in enumerate(sequences, start=1):
            n = len(ids)
            span = slice(at, at + n)
            batch["inputs"][b, span] = ids
            batch["targets"][b, at:at + n - 1] = ids[1:]
            batch["loss_mask"][b, at + prompt - 1:at + n - 1] = 1.0  # targets that are response tokens
            batch["segment_ids"][b, span] = s
            batch["positions"][b, span] = np.arange(n)
            batch["kto_label"][b, span] = label
            at += n
        assert at <= LENGTH
    return batch


def _pair_batch():
    def unit(p):
        n = len(p["prompt_ids"])
        return [(p["prompt_ids"] + p["chosen_ids"], n, 0.0), (p["prompt_ids"] + p["rejected_ids"], n, 0.0)]

    batch = _rows([[seq for i in row for seq in unit(PAIRS[i])] for row in ROWS])
    del batch["kto_label"]
    return batch


def _with_reference_logps(batch, directory):
    """`batch` with `ref_logps`: each segment's summed response log-prob under the reference, computed by
    `transformers`, on every position of the segment (the precomputed-reference layout)."""
    model = _hf(directory).eval()
    ref = np.zeros(batch["inputs"].shape, np.float32)
    with torch.no_grad():
        for b in range(len(ref)):
            for s in range(1, batch["segment_ids"][b].max() + 1):
                at = batch["segment_ids"][b] == s
                logits = model(torch.tensor(batch["inputs"][b][at][None].astype(np.int64))).logits[0]
                logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"][b][at][:, None]).long())
                ref[b][at] = float((logp[:, 0] * torch.tensor(batch["loss_mask"][b][at])).sum())
    return {**batch, "ref_logps": ref}


def _kto_batch():
    def unit(e):
        n, label = len(e["prompt_ids"]), float(e["label"])
        return [(e["prompt_ids"] + e["completion_ids"], n, label), (e["prompt_ids"] + e["KL_completion_ids"], n, label)]

    return _rows([[seq for e in KTO[i:i + 2] for seq in unit(e)] for i in (0, 2)])  # two units to a row


def ours(objective: str, models, batch, tmp_path, **preference_options):
    """(loss, metrics, {HF weight name: gradient}) of our objective on `batch` (the fixture's policy, reference).
    Not jitted: the objectives share the model's operations, so op-by-op each test after the first compiles
    little (a jit of each would compile the whole step again)."""
    dirs, (policy, reference) = models
    cfg = dataclasses.replace(Config(), model=policy.config,
                              data=DataConfig(objective=ObjectiveConfig(name=objective)),
                              preference=PreferenceConfig(**preference_options))
    loss_fn = {"dpo": preference.dpo_loss, "kto": preference.kto_loss, "orpo": preference.orpo_loss,
               "simpo": preference.simpo_loss}[objective]
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

    # a batch carrying precomputed reference log-probs (`ref_logps`) needs no reference model
    frozen = {} if "ref_logps" in batch else {
        "reference": FrozenModel(reference.params, reference.graphdef, reference.config)}
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy.params, policy.graphdef, batch,
                                                                       normalizers(batch), None, frozen, cfg)
    out = save_hf(grads, policy.config, tmp_path / "grads")
    return float(loss), {k: float(v) for k, v in metrics.items()}, load_file(out / "model.safetensors")


def _compare(mine, theirs, metric_names):
    loss, metrics, grads = mine
    t_loss, t_metrics, t_grads = theirs
    np.testing.assert_allclose(loss, t_loss, rtol=RTOL)
    for name in metric_names:
        np.testing.assert_allclose(metrics[name], t_metrics[name], rtol=RTOL, atol=1e-6, err_msg=name)
    assert set(grads) == set(t_grads)
    for name, g in t_grads.items():
        scale = np.max(np.abs(g))
        assert scale > 0, name
        assert np.max(np.abs(grads[name] - g)) <= RTOL * scale, name


# ------------------------------------------------------------------------------------------ TRL's side


def _trl_metrics(trainer):
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_dpo(models, tmp_path, **options):
    dirs = models[0]
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, ref = _hf(dirs[0]), _hf(dirs[1]).eval()
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=3,
                     **{k: [v] if k == "loss_type" else v for k, v in options.items()})
    dummy = Dataset.from_list([{"prompt": "t3", "chosen": " t4", "rejected": " t5"}])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=_tokenizer(), train_dataset=dummy)
    loss = trainer.compute_loss(model, trainer.data_collator(PAIRS))
    loss.backward()
    return float(loss), _trl_metrics(trainer), _trl_grads(model)


def trl_kto(models, tmp_path, **options):
    dirs = models[0]
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, ref = _hf(dirs[0]), _hf(dirs[1]).eval()
    args = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=4,
                     **options)
    dummy = Dataset.from_list([{"prompt": "t3", "completion": " t4", "label": i % 2 == 0} for i in range(4)])
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, processing_class=_tokenizer(), train_dataset=dummy)
    loss = trainer.compute_loss(model, trainer.data_collator(KTO))
    loss.backward()
    return float(loss), _trl_metrics(trainer), _trl_grads(model)


def _padded(rows, value):
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _cpo_batch():
    """ORPO's and CPO's pre-tokenized batch: chosen_* and rejected_* ids, masks and labels (-100 on the prompt)."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [p["prompt_ids"] + p[f"{side}_ids"] for p in PAIRS]
        labels = [[-100] * len(p["prompt_ids"]) + p[f"{side}_ids"] for p in PAIRS]
        batch[f"{side}_input_ids"] = _padded(ids, PAD)
        batch[f"{side}_attention_mask"] = _padded([[1] * len(i) for i in ids], 0)
        batch[f"{side}_labels"] = _padded(labels, -100)
    return batch


def trl_cpo(kind, models, tmp_path, **options):
    """ORPOTrainer (kind orpo) or CPOTrainer (kind simpo): `get_batch_loss_metrics` on the pairs."""
    from datasets import Dataset

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Cfg, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Cfg, CPOTrainer as Trainer
        options = {"loss_type": "simpo", **options}
    model = _hf(models[0][0])
    args = Cfg(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=3,
               max_length=LENGTH, **options)
    dummy = Dataset.from_list([{"prompt": "t3", "chosen": " t4", "rejected": " t5"}])
    trainer = Trainer(model=model, args=args, processing_class=_tokenizer(), train_dataset=dummy)
    loss, metrics = trainer.get_batch_loss_metrics(model, _cpo_batch())
    loss.backward()
    return float(loss), metrics, _trl_grads(model)


# ------------------------------------------------------------------------------------------ tests

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


@pytest.mark.parametrize("options", [dict(loss_type="sigmoid", beta=0.1), dict(loss_type="ipo", beta=0.5),
                                     dict(loss_type="robust", beta=0.1, label_smoothing=0.2),
                                     dict(loss_type="hinge", beta=0.1)], ids=lambda o: o["loss_type"])
def test_dpo_matches_trls_dpo_trainer(models, tmp_path, options):
    mine, theirs = ours("dpo", models, _pair_batch(), tmp_path, **options), trl_dpo(models, tmp_path, **options)
    _compare(mine, theirs, PAIR_METRICS)


def test_dpo_with_precomputed_reference_logps_matches_trls_dpo_trainer(models, tmp_path):
    """The reference's log-probs stored with the data (TRL's `precompute_ref_log_probs`) instead of a model."""
    batch = _with_reference_logps(_pair_batch(), models[0][1])
    mine = ours("dpo", models, batch, tmp_path, loss_type="sigmoid", beta=0.1)
    _compare(mine, trl_dpo(models, tmp_path, loss_type="sigmoid", beta=0.1), PAIR_METRICS)


def test_kto_matches_trls_kto_trainer(models, tmp_path):
    options = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    mine, theirs = ours("kto", models, _kto_batch(), tmp_path, **options), trl_kto(models, tmp_path, **options)
    _compare(mine, theirs, ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                            "kl"))


def test_orpo_matches_trls_orpo_trainer(models, tmp_path):
    mine, theirs = ours("orpo", models, _pair_batch(), tmp_path, beta=0.2), trl_cpo("orpo", models, tmp_path, beta=0.2)
    _compare(mine, theirs, (*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"))


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_matches_trls_cpo_trainer(models, tmp_path, cpo_alpha):
    options = dict(beta=2.0, simpo_gamma=0.8, cpo_alpha=cpo_alpha)
    mine = ours("simpo", models, _pair_batch(), tmp_path, **options)
    theirs = trl_cpo("simpo", models, tmp_path, **options)
    # TRL reports nll_loss 0 when cpo_alpha is 0 (it skips computing it); we log the chosen responses' NLL anyway
    _compare(mine, theirs, (*PAIR_METRICS, "nll_loss") if cpo_alpha else PAIR_METRICS)
