"""Reward models against transformers and TRL: `*ForSequenceClassification` (num_labels=1) converts both ways
(bit-exact round trip, rewards within the parity tolerance of tests/convert/test_parity.py: max |ours - theirs|
<= 1e-4 * max |theirs|), and the Bradley-Terry objective equals TRL's `RewardTrainer.compute_loss` in loss
(rtol 1e-5) and in the gradient of every parameter (max |ours - theirs| <= 1e-4 * max |theirs|) on the same
tiny model and pairs, with a margin and the centring term."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

from jaxllm import from_hf
from jaxllm.config import Config, DataConfig, ObjectiveConfig
from jaxllm.convert.hf import load_hf_params, save_hf
from jaxllm.sharding import make_rules
from jaxllm.train.losses import normalizers
from jaxllm.train.reward import reward_loss

PAD, EOS, VOCAB = 0, 2, 97

CASES = {
    "llama": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=PAD)),
    "qwen2": lambda: T.Qwen2ForSequenceClassification(T.Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=64, num_labels=1, pad_token_id=PAD)),
    "gpt2": lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
        vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=3, n_positions=32, num_labels=1, pad_token_id=PAD)),
}


def _hf_model(name, directory):
    torch.manual_seed(0)
    model = CASES[name]()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # non-trivial values also where weights start at 0 or 1 (biases, norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(directory, safe_serialization=True)
    return model


def _pairs(rng, n=3):
    """n pairs (chosen ids, rejected ids): a shared prompt, then a response and EOS; no pad or EOS inside."""
    out = []
    for _ in range(n):
        prompt = list(rng.integers(3, VOCAB, rng.integers(2, 5)))
        out.append(tuple(prompt + list(rng.integers(3, VOCAB, rng.integers(1, 6))) + [EOS] for _ in range(2)))
    return out


def _packed(pairs, rows, length, margins):
    """Preference rows (docs/post-training.md): pair k of a row is segments 2k-1 (chosen), 2k (rejected)."""
    batch = {k: np.zeros((rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch.update(loss_mask=np.zeros((rows, length), np.float32), margin=np.zeros((rows, length), np.float32))
    row, at, seg = 0, 0, 0
    for (chosen, rejected), margin in zip(pairs, margins):
        if at + len(chosen) + len(rejected) > length:
            row, at, seg = row + 1, 0, 0
        for ids in (chosen, rejected):
            seg, n = seg + 1, len(ids)
            batch["inputs"][row, at:at + n] = ids
            batch["targets"][row, at:at + n - 1] = ids[1:]
            batch["segment_ids"][row, at:at + n] = seg
            batch["positions"][row, at:at + n] = np.arange(n)
            batch["loss_mask"][row, at + 1:at + n - 1] = 1.0  # (the prompt's length does not matter here)
            batch["margin"][row, at:at + n] = margin
            at += n
    return batch


def _right_padded(seqs):
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("name", list(CASES))
def test_rewards_match_transformers_and_round_trip_is_exact(name, tmp_path):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "exported"
    hf_model = _hf_model(name, hf_dir)
    loaded = from_hf(hf_dir)
    assert loaded.config.head == "reward" and "lm_head" not in loaded.params

    seqs = [s for pair in _pairs(np.random.default_rng(1)) for s in pair]
    ids, mask = _right_padded(seqs)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()  # at the last non-pad token
    segments = mask.numpy().astype(np.int32)
    rewards = np.asarray(jax.jit(lambda t, s: loaded.model(t, None, s)[0])(ids.numpy(), segments))
    ours = rewards[np.arange(len(seqs)), mask.sum(1).numpy() - 1]
    error = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert error <= 1e-4, f"{name}: relative max error {error:.2e}"

    save_hf(loaded.params, loaded.config, out_dir, pad_token_id=PAD)
    again = load_hf_params(out_dir, loaded.config, loaded.mesh, make_rules())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, again)
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert set(exported) <= set(original) and "score.weight" in exported
    for tensor_name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[tensor_name], err_msg=tensor_name)
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model) and reloaded.config.num_labels == 1
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(input_ids=ids, attention_mask=mask).logits[:, 0].numpy(), theirs,
                                   atol=1e-6)


def _trl_compute_loss(model, inputs, center):
    """TRL 1.16's `RewardTrainer.compute_loss` itself, on the few trainer attributes it reads."""
    from trl.trainer.reward_trainer import RewardTrainer

    identity = lambda x: x  # noqa: E731  (one process: gathering is the identity)
    trainer = types.SimpleNamespace(
        model=model, args=types.SimpleNamespace(center_rewards_coefficient=center),
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _total_train_tokens=0, _tp_size=1, _metrics={"train": __import__("collections").defaultdict(list)})
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("name,center", [("llama", None), ("gpt2", 0.01)])
def test_bradley_terry_loss_and_gradients_equal_trls(name, center, tmp_path):
    hf_model = _hf_model(name, tmp_path / "hf")
    loaded = from_hf(tmp_path / "hf")
    pairs, margins = _pairs(np.random.default_rng(2), 3), [0.5, 0.0, -0.25]

    hf_model.train()  # no dropout in these configs' defaults that matters: attention/residual dropout are 0
    for module in hf_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = _right_padded([c for c, _ in pairs] + [r for _, r in pairs])  # TRL: chosen first, then rejected
    loss, metrics = _trl_compute_loss(hf_model, {"input_ids": ids, "attention_mask": mask,
                                                 "margin": torch.tensor(margins)}, center)
    loss.backward()

    cfg = Config(data=DataConfig(objective=ObjectiveConfig(name="reward", center_rewards_coefficient=center)))
    batch = {k: jnp.asarray(v) for k, v in _packed(pairs, 3, 40, margins).items()}
    assert int(batch["segment_ids"][0].max()) >= 4 and int(batch["segment_ids"][2].max()) == 0  # packed; a pad row

    def objective(params):
        return reward_loss(params, loaded.graphdef, batch, normalizers(batch), jax.random.key(0), {}, cfg)

    (ours, our_metrics), grads = jax.value_and_grad(objective, has_aux=True)(loaded.params)
    np.testing.assert_allclose(float(ours), loss.item(), rtol=1e-5)
    for key in ("accuracy", "margin", "mean_reward"):
        np.testing.assert_allclose(float(our_metrics[key]), metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Our gradients written as a Hugging Face checkpoint name them as torch names its parameters.
    save_hf(grads, loaded.config, tmp_path / "grads")
    ours_by_name = load_file(tmp_path / "grads" / "model.safetensors")
    theirs_by_name = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if n in ours_by_name}
    assert set(theirs_by_name) == set(ours_by_name)
    for tensor_name, theirs in theirs_by_name.items():
        error = np.max(np.abs(ours_by_name[tensor_name] - theirs)) / max(np.max(np.abs(theirs)), 1e-12)
        assert error <= 1e-4, f"{tensor_name}: relative max error {error:.2e}"


def test_a_classifier_with_several_labels_is_refused():
    from jaxllm.convert.hf import config_from_hf
    from jaxllm.convert.hf_io import ConversionError

    hf = T.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_labels=3).to_dict()
    hf["architectures"] = ["LlamaForSequenceClassification"]
    with pytest.raises(ConversionError, match="num_labels=3: jaxllm converts reward models"):
        config_from_hf(hf)
    hf = T.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_labels=1).to_dict()
    hf["architectures"] = ["LlamaForSequenceClassification"]
    assert config_from_hf(hf).head == "reward"


def test_a_lora_reward_model_round_trips_through_peft_with_its_head(tmp_path):
    """The head LoRA trains in full is PEFT's modules_to_save: PEFT loads our adapter onto the transformers
    reward model and computes our rewards; we load it back exactly."""
    peft = pytest.importorskip("peft")
    from jaxllm.config import LoraConfig
    from jaxllm.convert.peft import load_peft_adapters, save_peft_adapters
    from jaxllm.models import lora

    hf_model = _hf_model("llama", tmp_path / "hf")
    base = from_hf(tmp_path / "hf")
    cfg = dataclasses.replace(base.config, lora=LoraConfig(rank=4, alpha=8, targets="attn/(q|v)$"))
    params = lora.adapt(base.params, cfg)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(  # trained-looking adapters and head
        lambda p, x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype)
        if any(getattr(k, "key", "") in ("lora_b", "score") for k in p) else x, params)
    save_peft_adapters(params, cfg, tmp_path / "adapter")
    again, again_cfg = load_peft_adapters(tmp_path / "adapter", base.params, base.config)
    assert again_cfg.lora.rank == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)

    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    seqs = [s for pair in _pairs(np.random.default_rng(4), 2) for s in pair]
    ids, mask = _right_padded(seqs)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
    from jaxllm import models

    rewards = np.asarray(models.bind(models.model_spec(cfg)[0], params)(ids.numpy(), None, mask.numpy())[0])
    ours = rewards[np.arange(len(seqs)), mask.sum(1).numpy() - 1]
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))
