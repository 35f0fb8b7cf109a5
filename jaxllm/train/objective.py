"""Objectives: what a training method plugs into the one Trainer.

An objective is chosen by `data.objective.name` and is

- a batch format: the data pipeline's stages from documents to rows and the arrays of a batch
  (`jaxllm.data.objectives.BatchFormat`, registered under the same name);
- the model architectures it trains (`archs`);
- a loss: a pure function `loss(params, graphdef, batch, norms, key, frozen, cfg) -> (objective,
  metrics)`, both already divided by the whole batch's counts in `norms` (see `step.normalizers`), so
  gradient accumulation sums exact contributions; `metrics["loss"]` is what the loop logs and what
  evaluation averages (each batch's value weighted by the count `loss_count` names: `step.eval_step`);
- the frozen models it needs (`frozen_models(cfg) -> {name: FrozenSource}`): a reference policy, a
  teacher, a reward model. The Trainer loads each beside the trained model, sharded by the same rules,
  never differentiated, never in the optimizer state or the checkpoint, and hands them to the loss as
  `frozen[name]` (a `FrozenModel`);
- `prepare(cfg, tokenizer) -> cfg`: checks at startup that need the run's tokenizer (a teacher's must be
  the same), before any frozen model is loaded; returns the config with what they resolve;
- for online methods (jaxllm/rl: grpo, ppo, rloo) `online(trainer)`: the data the trainer trains on instead of
  the data pipeline, made from the trainer itself (batches of rollouts from its live parameters), with the
  pipeline's interface (`__next__`, `get_state`, `set_state`, `close`) plus `evaluate()` (the held-out metrics)
  and `step_metrics(seconds)` (the rollouts' metrics and the tokens its updates read, merged into each logged row).

A new method registers an `Objective` here and a `BatchFormat` in data/, and adds its name to the choices
of `ObjectiveConfig.name` (config/schema.py); the Trainer, step, checkpoints, resume, faults, meshes, LoRA
and logging come with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from jaxllm.config import Config, ConfigError, JaxllmError
from jaxllm.data import sft  # noqa: F401 (the sft objective's batch format, registered with it)
from jaxllm.train.frozen import FrozenModel, FrozenSource
from jaxllm.train.losses import pretraining_loss, sft_loss

Loss = Callable[[Any, Any, dict[str, jax.Array], dict[str, jax.Array], jax.Array, dict[str, FrozenModel], Config],
                tuple[jax.Array, dict[str, jax.Array]]]


def _no_frozen_models(cfg: Config) -> dict[str, FrozenSource]:
    return {}


def _nothing_to_prepare(cfg: Config, tokenizer: Any) -> Config:
    return cfg


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training method (module docstring)."""

    name: str
    archs: tuple[str, ...]
    loss: Loss
    frozen_models: Callable[[Config], dict[str, FrozenSource]] = _no_frozen_models
    prepare: Callable[[Config, Any], Config] = _nothing_to_prepare
    # Metrics evaluation reports besides eval_loss, each a mean over the held-out set: (metric, the count in
    # `step.normalizers` it is divided by), e.g. ("mean_token_accuracy", "tokens"); logged as eval_<metric>.
    eval_metrics: tuple[tuple[str, str], ...] = ()
    # The count in `step.normalizers` that the loss is a mean over: eval_loss divides the summed loss by it
    # (and eval_ppl is logged only for a token loss).
    loss_count: str = "tokens"
    online: Optional[Callable[[Any], Any]] = None  # online methods: trainer -> its data (module docstring)
    # The batch's shapes when they depend on more than the data config (online methods: rl.max_new_tokens,
    # rl.shared_prefix): (cfg, batch_size) -> spec; None = the batch format's (`batch_spec(cfg.data, ...)`).
    spec: Optional[Callable[[Config, int], dict]] = None


_OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    _OBJECTIVES[objective.name] = objective
    return objective


def objective_for(cfg: Config) -> Objective:
    name = cfg.data.objective.name
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown data.objective.name={name}; choose one of {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def step_batch_spec(cfg: Config, batch_size: int) -> dict:
    """Shape and dtype of every array of a train step's batch of `batch_size` rows: the objective's own `spec`,
    else its batch format's (`data.objectives.batch_spec`)."""
    from jaxllm.data.objectives import batch_spec

    objective = objective_for(cfg)
    return objective.spec(cfg, batch_size) if objective.spec else batch_spec(cfg.data, batch_size)


def check_trainable(cfg: Config) -> Objective:
    """The objective of `cfg`, after checking that it fits the model: next-token for decoders, masked LM
    for encoders, denoising for encoder-decoders (or what a registered method trains)."""
    objective, arch = objective_for(cfg), cfg.model.arch
    if arch not in objective.archs:
        fits = [o.name for o in _OBJECTIVES.values() if arch in o.archs]
        raise JaxllmError(
            f"data.objective.name={objective.name} trains a model.arch={' or '.join(objective.archs)}, but this "
            f"model is arch={arch}; use data.objective.name={' or '.join(fits)}, or a config of the other kind "
            "under configs/"
        )
    if arch == "decoder" and (cfg.model.head == "reward") != (objective.name == "reward"):
        raise JaxllmError(
            f"data.objective.name={objective.name} with model.head={cfg.model.head}: a reward model (model.head=reward) "
            "trains with data.objective.name=reward, and that objective needs it; set both or neither"
        )
    if cfg.model.quant is not None and cfg.model.lora is None:
        raise JaxllmError("model.quant stores the base quantised and frozen; to train, add adapters with "
                          "model.lora (QLoRA), or drop model.quant")
    if arch == "encoder" and cfg.model.head != "mlm" and cfg.model.electra_generator is None:
        raise JaxllmError(
            f"an encoder with model.head={cfg.model.head} cannot be pre-trained: use head=mlm, or head=discriminator "
            "with model.electra_generator (ELECTRA)"
        )
    return objective


def _pretraining(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """The pretraining objectives' loss (`losses.pretraining_loss`): it follows the model (next tokens for
    a Decoder, masked tokens for an Encoder, decoder targets for an EncoderDecoder, ELECTRA's two heads)."""
    return pretraining_loss(params, graphdef, batch, norms, cfg.train.z_loss, key, cfg.train.loss_chunk)


def _sft(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """Supervised fine-tuning (`losses.sft_loss`): the clm loss on the assistant's tokens, with TRL's metrics."""
    return sft_loss(params, graphdef, batch, norms, cfg.train.z_loss, cfg.train.loss_chunk)


register(Objective("clm", ("decoder",), _pretraining))
register(Objective("sft", ("decoder",), _sft,
                   eval_metrics=(("mean_token_accuracy", "tokens"), ("exact_match", "examples"))))
register(Objective("mlm", ("encoder",), _pretraining))
for _name in ("span", "bart", "ul2"):
    register(Objective(_name, ("encoder_decoder",), _pretraining))
