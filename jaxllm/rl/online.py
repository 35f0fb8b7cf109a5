"""The data of an online objective (grpo, rloo, ppo): batches of rollouts from the trainer's live parameters.

`OnlineData` takes the data pipeline's place in the one Trainer (`Objective.online`). When its buffer is empty it
makes one rollout and the batches of its updates:

    prompts (data.sources, read by the ordinary sources: on_bad_record, shuffle window, resumable position)
    -> rollout: rl.num_generations completions of each of train.batch_size * rl.minibatches / n prompts, sampled
       from `trainer.state.params` (no copy) on the training mesh (jaxllm/rl/rollout.py), key = fold_in(train.seed,
       rollout index) so runs repeat and resume exactly
    -> rewards (rl.rewards, jaxllm/rl/rewards.py) of the decoded completions
    -> rows (left-padded prompt + completion window, prompts.rows) and, when the updates read any of them, one
       jitted forward pass before the updates: the policy's log-probs (old_logps: several updates per rollout, or
       ppo), the reference's (when a KL is used), the value head's values (ppo)
    -> advantages: grpo group-relative (rl.scale_rewards), rloo leave-one-out of reward - beta * sum KL(k1),
       ppo GAE(gamma, lam) of -kl_coef * KL(k1) per token + the score at the last token, whitened
    -> rl.epochs passes, each a fresh seeded permutation of the rollout's rows (of its groups, with
       rl.shared_prefix: each minibatch runs its prompts once, `shared_prefix_hidden`) cut into rl.minibatches
       batches.

DAPO's dynamic sampling (rl.dynamic_sampling) drops groups whose rewards are all equal (no signal) and rolls out
more prompts until the buffer is full; after rl.max_rollout_tries rollouts the dropped groups fill what is left.

PPO-ptx (rl.ptx_coef > 0): every update's batch also holds train.batch_size clm rows (`ptx_*` fields) of
rl.ptx_sources, read by the trainer's ordinary data pipeline (objectives.py adds their loss).

The state (`get_state`) is the prompt source's position, the rollout count, the buffer position, the adaptive
KL coefficient and the ptx pipeline's position; checkpoints happen between rollouts only (the config checks
train.steps and checkpoint.every are multiples of rl.epochs * rl.minibatches, and a SIGTERM finishes the
rollout's updates first), so a resumed run makes exactly the rollouts (and reads the ptx rows) the uninterrupted
one makes. One process (any number of devices) for now.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding
from jaxllm.config import Config, JaxllmError, ObjectiveConfig
from jaxllm.infer.generate import CHAT_STOP_TOKENS
from jaxllm.infer.beam import expand_cache
from jaxllm.models import bind, init_cache
from jaxllm.rl import losses
from jaxllm.rl.prompts import PromptEncoder, prompt_pipeline, rows
from jaxllm.rl.rewards import compute_rewards, reward_functions, reward_metrics
from jaxllm.rl.rollout import SamplingSettings, rollout
from jaxllm.train.frozen import frozen_shardings
from jaxllm.train.losses import chunked_sums
from jaxllm.train.preference import _without_adapters

log = logging.getLogger("jaxllm.rl")
_STATE_VERSION = 1


TRL_BETA = {"grpo": 0.0, "rloo": 0.05, "ppo": 0.0}  # TRL's default KL coefficients (ppo uses rl.kl_coef)


def beta(cfg: Config) -> float:
    """rl.beta, or TRL's default for the objective."""
    return TRL_BETA[cfg.data.objective.name] if cfg.rl.beta is None else cfg.rl.beta


def needs_reference(cfg: Config) -> bool:
    """A reference policy is used: grpo and rloo with beta > 0 (TRL skips it at 0), ppo with kl_coef > 0."""
    if cfg.data.objective.name == "ppo":
        return cfg.rl.kl_coef > 0 or cfg.rl.kl_target is not None
    return beta(cfg) > 0


def on_policy(cfg: Config) -> bool:
    """One update per rollout: the old log-probs are the policy's own (TRL's shortcut, ratio 1)."""
    return cfg.rl.epochs * cfg.rl.minibatches == 1


def window_logps(model, batch, temperature: float, chunk: int, window: int, with_values: bool = False,
                 group: int = 1):
    """The forward pass of online rows (prompts.rows) over the last `window` positions (the completion window),
    the only ones projected to the vocabulary: log-probs of the targets under logits / temperature and the token
    entropies (float32 [B, W], 0 off the loss mask), the MoE aux sums, and with `with_values` the value head's
    values [B, W] (else None). Rows with a shared prefix (`prefix_inputs`): each `group` consecutive rows hold one
    prompt, which runs once (`shared_prefix_hidden`)."""
    if "prefix_inputs" in batch:
        x_BLD, moe_aux = shared_prefix_hidden(model, batch, group)
    else:
        x_BLD, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    x_BWD = x_BLD[:, -window:]
    targets_BW, mask_BW = batch["targets"][:, -window:], batch["loss_mask"][:, -window:].astype(jnp.float32)

    def piece(x_BCD, t_BC, m_BC):
        logits = model.logits(x_BCD).astype(jnp.float32) / temperature
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), t_BC[..., None], -1)[..., 0]
        return (), (logp * m_BC, jax.lax.stop_gradient(losses.token_entropy(logits)) * m_BC)

    _, (logps, entropy) = chunked_sums(piece, (x_BWD, targets_BW, mask_BW), chunk, per_position=True)
    return logps, entropy, moe_aux, (model.values(x_BWD) if with_values else None)


def shared_prefix_hidden(model, batch, group: int):
    """Hidden states [B, W, D] of the completion windows of rows whose `group` consecutive rows share a prompt
    (prompts.rows with shared_prefix): the prompts (but their last token) run once, B / group rows, into a KV cache,
    which is repeated to the group's rows; the windows then attend to it and to themselves. The same values as
    running each whole row, with the prompt's work (forward and backward) done once per group, not per completion.
    And the MoE aux sums of both passes."""
    B, Pp = batch["prefix_inputs"].shape
    first = lambda a: a.reshape(B // group, group, *a.shape[1:])[:, 0]
    cache = init_cache(model.cfg, B // group, Pp + batch["inputs"].shape[1])
    _, cache, prefix_aux = model.hidden(first(batch["prefix_inputs"]), first(batch["prefix_positions"]),
                                        first(batch["prefix_segment_ids"]), cache)
    x_BWD, _, aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                                 expand_cache(cache, group))
    return x_BWD, jax.tree.map(jnp.add, prefix_aux, aux)


def reference_model(params, graphdef, frozen):
    """The reference: the frozen `reference` model, else (model.lora) the policy with its adapters off."""
    if "reference" in frozen:
        return frozen["reference"].bind()
    return bind(graphdef, jax.lax.stop_gradient(_without_adapters(params)))


class OnlineData:
    """The trainer's data for an online objective (module docstring): the data pipeline's interface (`__next__`,
    `get_state`, `set_state`, `close`) plus `evaluate()` and `step_metrics()` (the trainer's hooks)."""

    def __init__(self, trainer):
        if jax.process_count() > 1:
            raise JaxllmError("online RL (grpo, rloo, ppo) runs in one process for now (any number of its devices); "
                              "start it on one host")
        self._trainer, self.cfg = trainer, trainer.cfg
        cfg, r, tokenizer = trainer.cfg, trainer.cfg.rl, trainer.tokenizer
        self.name = cfg.data.objective.name
        self._tokenizer = tokenizer
        self._encode = PromptEncoder(cfg, tokenizer)
        stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        if self._encode._template is not None:
            stops += [i for i in map(tokenizer.token_to_id, CHAT_STOP_TOKENS) if i is not None]
        self._stops = tuple(stops)
        self.settings = SamplingSettings(num_generations=r.num_generations, max_new_tokens=r.max_new_tokens,
                                         temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, stop_ids=self._stops)
        self._prompts = prompt_pipeline(cfg, cfg.data.sources, self._encode, None, shuffle=True)
        # PPO-ptx: clm rows of rl.ptx_sources, the data pipeline's (its reader, shuffle window, on_bad_record)
        self._ptx = trainer._pipeline(dataclasses.replace(cfg.data, sources=r.ptx_sources, objective=ObjectiveConfig())
                                      ) if r.ptx_coef > 0 else None
        self._rewards = reward_functions(r.rewards, mesh=trainer.mesh, rules=trainer.rules)
        self._size = cfg.train.batch_size * r.minibatches  # completions per rollout
        self._buffer: list[dict[str, np.ndarray]] = []
        self._position = 0
        self._rollouts = 0
        self._kl = losses.AdaptiveKL(r.kl_coef, r.kl_target, r.kl_horizon) if r.kl_target is not None else None
        self._metrics: dict[str, float] = {}  # the latest rollout's
        self._logged: list[dict[str, float]] = []  # the rollouts' metrics since the last step_metrics()
        self._busy = 0.0  # seconds spent making rollouts since the last step_metrics()
        self._tokens = 0  # row positions of the batches handed out since then
        self._score: dict[int, Any] = {}  # the jitted scoring pass per completion-window width

    # ---------------------------------------------------------------------------- the pipeline interface

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position == len(self._buffer):
            self._fill()
        batch = self._buffer[self._position]
        self._position += 1
        self._tokens += batch["inputs"].size  # a shared prefix: its tokens once per group
        self._tokens += batch["prefix_inputs"].size // self.cfg.rl.num_generations if "prefix_inputs" in batch else 0
        if self._ptx is not None:
            ptx = {f"ptx_{k}": v for k, v in next(self._ptx).items()}
            self._tokens += ptx["ptx_inputs"].size
            batch = {**batch, **ptx}
        return batch

    def at_boundary(self) -> bool:
        """True between rollouts (every batch of the buffer handed out): where a run may stop and save."""
        return self._position == len(self._buffer)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "objective": self.name, "prompts": self._prompts.get_state(),
                "rollouts": self._rollouts, "position": self._position, "buffered": len(self._buffer),
                "kl_coef": None if self._kl is None else self._kl.value,
                "ptx": None if self._ptx is None else self._ptx.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION or state.get("objective") != self.name:
            raise JaxllmError(f"the data state was saved by another objective or jaxllm version ({state.get('objective')}"
                              f"); resume with data.objective.name={state.get('objective')}, or train in a new run_dir")
        if state["position"] != state["buffered"]:
            raise JaxllmError("the data state was saved in the middle of a rollout's updates, which cannot be "
                              "replayed; resume with the run's own rl.epochs and rl.minibatches, or a new run_dir")
        self._prompts.set_state(state["prompts"])
        self._rollouts, self._buffer, self._position = state["rollouts"], [], 0
        if self._kl is not None and state.get("kl_coef") is not None:
            self._kl.value = state["kl_coef"]
        if self._ptx is not None and state.get("ptx") is not None:  # a run that turned ptx on reads from the start
            self._ptx.set_state(state["ptx"])

    def close(self) -> None:
        self._prompts.close()
        if self._ptx is not None:
            self._ptx.close()

    def step_metrics(self, seconds: float) -> dict[str, float]:
        """The rollouts' metrics since the last call, each the mean over those rollouts (TRL averages its logged
        metrics over the logging interval too; the latest rollout's when none was made since), with the share of
        the last `seconds` spent making rollouts, and the row positions (tokens) the updates read per second: over
        the whole interval (tokens_per_sec, the trainer's metric) and over the rest (train_tokens_per_sec)."""
        busy, self._busy = self._busy, 0.0
        tokens, self._tokens = self._tokens, 0
        logged, self._logged = self._logged or [self._metrics], []
        means = {k: _mean([m[k] for m in logged if k in m]) for k in logged[-1]}
        return {**means, "rollout_share": min(busy / max(seconds, 1e-9), 1.0),
                "tokens_per_sec": tokens / max(seconds, 1e-9),
                "train_tokens_per_sec": tokens / max(seconds - busy, 1e-9)}

    # ---------------------------------------------------------------------------- rollouts

    def _sample(self, items: list[dict], settings: SamplingSettings, key, rows: int) -> tuple[Any, list, list, list]:
        """A rollout of `items`' prompts (padded to `rows` rows: one compilation for every batch); (rollout,
        prompts, completions for the rewards, records), one per completion."""
        t = self._trainer
        with sharding.activate(t.mesh, t.rules):
            out = rollout(t.graphdef, t.state.params, t.cfg.model, [it["ids"] for it in items], settings, key,
                          self._tokenizer.pad_id, mesh=t.mesh, rules=t.rules, rows=rows)
        n = settings.num_generations
        texts = [self._text(items[i // n]["ids"], c, m) for i, (c, m) in
                 enumerate(zip(out.completion_tokens, out.completion_mask))]
        prompts = [items[i // n]["prompt"] for i in range(len(texts))]
        completions = [[{"role": "assistant", "content": s}] if isinstance(p, list) else s
                       for p, s in zip(prompts, texts)]
        return out, prompts, completions, [items[i // n]["record"] for i in range(len(texts))]

    def _text(self, prompt: np.ndarray, completion: np.ndarray, mask: np.ndarray) -> str:
        """The completion's text, without its stop token, decoded in the prompt's context (leading spaces)."""
        ids = [int(i) for i in completion[: int(mask.sum())]]
        if ids and ids[-1] in self._stops:
            ids = ids[:-1]
        ids = [i for i in ids if i < self._tokenizer.vocab_size]
        before, full = self._tokenizer.decode(list(prompt)), self._tokenizer.decode(list(prompt) + ids)
        return full[len(before):] if full.startswith(before) else self._tokenizer.decode(ids)

    def _fill(self) -> None:
        """One rollout and its batches (module docstring)."""
        # Train steps run asynchronously: wait for the last one here, so that its time is not counted as the
        # rollout's (rollout_share) and the rollout samples from the updated parameters' values.
        jax.block_until_ready(self._trainer.state.params)
        started = time.perf_counter()
        cfg, r, n = self.cfg, self.cfg.rl, self.cfg.rl.num_generations
        groups, dropped, kept, spare, tries, generating, generated = self._size // n, 0, [], [], 0, 0.0, 0
        while len(kept) < groups and tries < r.max_rollout_tries:
            items = [next(self._prompts) for _ in range(groups)]
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), self._rollouts), tries)
            t0 = time.perf_counter()
            out, prompts, completions, records = self._sample(items, self.settings, key, self._size)
            generating += time.perf_counter() - t0
            generated += int(out.completion_mask.sum())
            total, per = compute_rewards(self._rewards, prompts, completions, records,
                                         completion_ids=_completion_ids(out))
            for g in range(groups):
                rows_g = slice(g * n, (g + 1) * n)
                group = {"ids": [items[g]["ids"]] * n, "tokens": out.completion_tokens[rows_g],
                         "mask": out.completion_mask[rows_g], "truncated": out.truncated[rows_g],
                         "reward": np.asarray(total[rows_g], np.float32),
                         "per": {k: np.asarray(v[rows_g], np.float64) for k, v in per.items()}}
                if r.dynamic_sampling and _all_equal(group["reward"]):
                    dropped += 1
                    spare.append(group)
                else:
                    kept.append(group)
            tries += 1
            if not r.dynamic_sampling:
                break
        if len(kept) < groups:
            log.warning("rl.dynamic_sampling: %d of %d groups had varied rewards after %d rollouts; training on "
                        "%d groups of equal rewards too (no signal)", len(kept), groups, tries, groups - len(kept))
            kept += spare[: groups - len(kept)]
        self._rollouts += 1
        self._buffer, self._position = self._batches(kept[:groups]), 0
        if r.dynamic_sampling:
            self._metrics.update({"dynamic_sampling/dropped_groups": float(dropped),
                                  "dynamic_sampling/rollouts": float(tries)})
        self._metrics["rollout_tokens_per_sec"] = generated / max(generating, 1e-9)
        self._logged.append(self._metrics)
        self._busy += time.perf_counter() - started

    def _batches(self, groups: list[dict]) -> list[dict[str, np.ndarray]]:
        """The rollout's rows with old/reference log-probs, values and advantages, cut into the batches of its
        rl.epochs * rl.minibatches updates; sets the rollout's metrics."""
        cfg, r = self.cfg, self.cfg.rl
        cat = lambda key: np.concatenate([g[key] for g in groups])
        mask, truncated, reward = cat("mask"), cat("truncated"), cat("reward")
        per = {k: np.concatenate([g["per"][k] for g in groups]) for k in groups[0]["per"]}
        batch, window = rows([p for g in groups for p in g["ids"]], cat("tokens"), mask, cfg.data.seq_len,
                             shared_prefix=r.shared_prefix)
        if r.mask_truncated_completions:
            batch["loss_mask"] *= ~truncated[:, None]
        loss_mask = batch["loss_mask"][:, -window:]  # the completion window: what the RL fields are aligned with
        scored = self._scored(batch, window)
        metrics = reward_metrics(reward, per)
        lengths = mask.sum(1)
        metrics.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                        "completions/max_length": float(lengths.max()),
                        "completions/clipped_ratio": float(truncated.mean())})
        n = r.num_generations
        metrics["frac_reward_zero_std"] = float(np.mean([_all_equal(g["reward"]) for g in groups]))  # TRL's
        kl_tokens = (scored["old_logps"] - scored["ref_logps"]) * loss_mask  # k1 per token
        if self.name == "grpo":
            adv = np.asarray(losses.group_advantages(reward, n, r.scale_rewards))
            batch["advantages"] = np.repeat(adv[:, None], window, 1).astype(np.float32)
            metrics["advantages/mean"] = float(adv.mean())
        elif self.name == "rloo":
            shaped = reward - beta(cfg) * kl_tokens.sum(1) if needs_reference(cfg) else reward
            adv = np.asarray(losses.rloo_advantages(shaped, n, r.normalize_advantages))
            batch["advantages"] = np.repeat(adv[:, None], window, 1).astype(np.float32)
            metrics["advantages/mean"] = float(adv.mean())
            if needs_reference(cfg):
                metrics["kl"] = float(kl_tokens.sum() / max(loss_mask.sum(), 1.0))
        else:
            self._ppo_advantages(batch, scored, reward, loss_mask, metrics)
        batch.update({k: scored[k] for k in ("old_logps", "ref_logps") + (("values",) if self.name == "ppo" else ())})
        self._metrics = metrics
        out = []
        B = cfg.train.batch_size
        for epoch in range(r.epochs):
            rng = np.random.default_rng([cfg.data.seed, self._rollouts, epoch])
            if r.shared_prefix:  # whole groups, in a random order: each minibatch runs its prompts once
                order = (rng.permutation(len(reward) // n)[:, None] * n + np.arange(n)).reshape(-1)
            else:
                order = rng.permutation(len(reward))
            out += [{k: v[order[i * B:(i + 1) * B]] for k, v in batch.items()} for i in range(r.minibatches)]
        return out

    def _ppo_advantages(self, batch, scored, reward, mask, metrics) -> None:
        """PPO (TRL's classic PPOTrainer): per-token rewards -kl_coef * k1 + the score at the last token, GAE,
        whitened advantages, returns = advantages + values; the adaptive KL coefficient updated after. `mask`:
        the completion window's loss mask."""
        r = self.cfg.rl
        coef = r.kl_coef if self._kl is None else self._kl.value
        score = np.nan_to_num(reward)  # a sample no function scored: 0
        reference = scored["ref_logps"] if needs_reference(self.cfg) else scored["old_logps"]  # no KL without one
        token_rewards, non_score = (np.asarray(a) for a in losses.ppo_rewards(score, scored["old_logps"], reference,
                                                                               mask, coef))
        if r.whiten_rewards:
            token_rewards = np.asarray(losses.whiten(token_rewards, mask, shift_mean=False))
        adv, returns = losses.gae(token_rewards, scored["values"], mask, r.gamma, r.lam)
        batch["advantages"] = np.asarray(losses.whiten(adv, mask), np.float32)
        batch["returns"] = np.asarray(returns, np.float32)
        metrics.update({"kl_coef": coef, "non_score_reward": float((non_score * mask).sum(1).mean()),
                        "advantages/mean": float((batch["advantages"] * mask).sum() / max(mask.sum(), 1.0))})
        if needs_reference(self.cfg):
            kl = float(((scored["old_logps"] - reference) * mask).sum(1).mean())  # per sequence, as TRL's PPO
            metrics["kl"] = kl
            if self._kl is not None:
                self._kl.update(kl, len(reward))

    def _scored(self, batch: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
        """The old policy's log-probs, the reference's and (ppo) the values of the rows' completion windows
        ([N, window] float32), before any update: one jitted forward pass per train.batch_size rows. Only what the
        updates read: none at all (zeros) for a single on-policy update without a reference (grpo and rloo at
        beta 0, TRL's defaults), whose old log-probs are the policy's own (objectives.py)."""
        t, B, cfg = self._trainer, self.cfg.train.batch_size, self.cfg
        wanted = (("old_logps",) if not on_policy(cfg) or self.name == "ppo" else ()) + \
                 (("ref_logps",) if needs_reference(cfg) else ()) + (("values",) if self.name == "ppo" else ())
        zeros = np.zeros((len(batch["inputs"]), window), np.float32)
        out = {"old_logps": zeros, "ref_logps": zeros}
        if not wanted:
            return out
        if window not in self._score:
            self._score[window] = jax.jit(functools.partial(self._score_rows, wanted=wanted, window=window),
                                          in_shardings=(t.state_shardings.params, t.batch_sharding,
                                                        frozen_shardings(t.frozen)))
        parts = []
        keys = [k for k in batch if k not in ("advantages", "returns")]  # the rows' token fields
        for i in range(0, len(batch["inputs"]), B):
            chunk = {k: jax.device_put(batch[k][i:i + B], t.batch_sharding) for k in keys}
            with sharding.activate(t.mesh, t.rules):
                parts.append(jax.device_get(self._score[window](t.state.params, chunk, t.frozen)))
        return {**out, **{k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}}

    def _score_rows(self, params, batch, frozen, wanted, window):
        t, cfg = self._trainer, self.cfg
        T, chunk, W = cfg.rl.temperature, cfg.train.loss_chunk, window
        out = {}
        if "old_logps" in wanted or "values" in wanted:
            logps, _, _, values = window_logps(bind(t.graphdef, params), batch, T, chunk, W, "values" in wanted,
                                               cfg.rl.num_generations)
            out["old_logps"] = logps
            if "values" in wanted:
                out["values"] = values * batch["loss_mask"][:, -W:]
        if "ref_logps" in wanted:
            ref = reference_model(params, t.graphdef, frozen)
            out["ref_logps"] = window_logps(ref, batch, T, chunk, W, group=cfg.rl.num_generations)[0]
        return out

    # ---------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """Held-out reward: the mean total reward of greedy completions of eval.sources' prompts (each read once,
        at most eval.batches * train.batch_size prompts), as eval_reward, and each function's as
        eval_reward/NAME; with several sources also eval_reward/SOURCE. With rl.eval_samples = k > 0 also the mean
        reward of k completions per prompt sampled as the rollouts sample (rl.temperature, top_k, top_p; TRL's
        evaluation), as eval_reward_sampled (/NAME, /SOURCE alike)."""
        cfg, r = self.cfg, self.cfg.rl
        kinds = {"eval_reward": SamplingSettings(num_generations=1, max_new_tokens=r.max_new_tokens,
                                                 temperature=0.0, stop_ids=self._stops)}
        if r.eval_samples:
            kinds["eval_reward_sampled"] = dataclasses.replace(self.settings, num_generations=r.eval_samples,
                                                               stop_ids=self._stops)
        limit = cfg.eval.batches * cfg.train.batch_size if cfg.eval.batches else None
        sources = []
        for source in cfg.eval.sources:
            pipeline = prompt_pipeline(cfg, [source], self._encode, 1, shuffle=False)
            try:
                items = [it for _, it in zip(range(limit) if limit else itertools.count(), pipeline)]
            finally:
                pipeline.close()
            if not items:
                raise JaxllmError(f"eval.sources {source.path} holds no usable prompts")
            sources.append((source.path, items))
        metrics = {}
        for prefix, settings in kinds.items():
            metrics.update(self._held_out(prefix, settings, sources))
        return metrics

    def _held_out(self, prefix: str, settings: SamplingSettings, sources: list) -> dict[str, float]:
        """The mean rewards of `settings`' completions of each source's prompts (`evaluate`); sampled ones draw
        from fixed keys, so every evaluation of a run samples alike."""
        cfg, n = self.cfg, settings.num_generations
        per_call = max(cfg.train.batch_size // n, 1)  # prompts per sampling call: train.batch_size rows
        totals, pers, metrics = [], [], {}
        for path, items in sources:
            source_totals = []
            for i in range(0, len(items), per_call):
                out, prompts, completions, records = self._sample(items[i:i + per_call], settings,
                                                                  jax.random.fold_in(jax.random.key(0), i), per_call * n)
                total, per = compute_rewards(self._rewards, prompts, completions, records,
                                             completion_ids=_completion_ids(out))
                source_totals.append(np.asarray(total, np.float64))
                pers.append({k: np.asarray(v, np.float64) for k, v in per.items()})
            totals += source_totals
            if len(sources) > 1:
                metrics[f"{prefix}/{path}"] = float(np.nanmean(np.concatenate(source_totals)))
        metrics[prefix] = float(np.nanmean(np.concatenate(totals)))
        for name in pers[0]:
            values = np.concatenate([p[name] for p in pers])
            metrics[f"{prefix}/{name}"] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
        return metrics


def _completion_ids(out) -> list[np.ndarray]:
    """The completions' token ids (TRL's `completion_ids` for the reward functions), the stop token kept."""
    return [c[: int(m.sum())] for c, m in zip(out.completion_tokens, out.completion_mask)]


def _all_equal(rewards: np.ndarray) -> bool:
    """No learning signal in a group: its scored rewards are all the same (or none scored)."""
    scored = rewards[~np.isnan(rewards)]
    return scored.size == 0 or bool(np.all(scored == scored[0]))


def _mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")
