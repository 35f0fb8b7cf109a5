"""Rejection-sampling fine-tuning (best-of-n: Llama 2 section 3.2.3, RAFT, TRL's BestOfNSampler), from one command:
`jaxllm train CONFIG` with `rl.algorithm: best_of_n` (the rl.best_of_n section, BestOfNConfig).

Round r = 1..rounds, all of it under RUN_DIR/round-r/:

    the current model: train.init_from for round 1, else round r-1's final checkpoint, loaded on the mesh
    -> rl.num_generations samples of each of prompts_per_round prompts: the data.sources prompt stream, which
       rotates (round r takes the prompts after round r-1's), rendered, sampled and decoded as the online RL
       loop does it (jaxllm.rl.online.OnlineData on the loaded model), key fold_in(key(train.seed), r)
    -> scored with rl.rewards (jaxllm.rl.rewards.compute_rewards)
    -> kept (`select`): each prompt's best sample (ties: the first sampled), or with keep=threshold every sample
       whose reward is >= threshold (identical texts once); a prompt whose best is below min_reward keeps none;
       unscored samples, and with rl.mask_truncated_completions those without a stop token, are never kept
    -> samples.jsonl (every sample, its rewards, kept or not), data.jsonl (the kept pairs as an SFT set in TRL's
       prompt-completion format, under data.objective.prompt_field / completion_field), sampling.json (the
       round's sampling metrics; it is written last and marks the sampling done), each written atomically
    -> supervised fine-tuning (data.objective.name: sft) on data.jsonl for best_of_n.sft_steps steps in the one
       Trainer, run_dir round-r/ (checkpoints, metrics.jsonl), init_from the current model; eval.sources (held-out
       prompts, not SFT data) are scored here instead.

RUN_DIR/rounds.jsonl and RUN_DIR/tensorboard get a row per round (step = r): the sampling metrics (reward: mean
of all samples, reward_kept, kept, prompts_kept, rewards/NAME/mean, ...) and, with eval.sources, the held-out
reward of greedy completions of round r's model (eval_reward, eval_reward/NAME, as the online loop's evaluate);
with eval.at_start also row 0, the starting model's.

Resumable: a round is finished when round-r/checkpoints/<sft_steps> exists. A re-run skips finished rounds,
continues an unfinished round (its samples reused when sampling.json exists, its SFT resumed from its own
checkpoints) and writes the rows missing from rounds.jsonl; a finished command re-run does nothing. Sampling
always loads the checkpoint (never the live trainer), so a resumed command samples exactly what an
uninterrupted one does. One process (as online RL), any number of its devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm import models, sharding
from jaxllm.config import Config, JaxllmError, SourceConfig
from jaxllm.data.objectives import special_ids, tokens_to_add
from jaxllm.data.tokenizer import load_tokenizer, load_tokenizer_from_files
from jaxllm.models.vocab import grown_vocab_size
from jaxllm.rl.online import OnlineData, _completion_ids
from jaxllm.rl.rewards import compute_rewards, reward_metrics
from jaxllm.train.frozen import load_frozen, open_pretrained
from jaxllm.train.metrics import MetricsWriter, read_metrics
from jaxllm.utils import atomic_write_text, ensure_writable_dir

log = logging.getLogger("jaxllm.rl")
ROUNDS = "rounds.jsonl"
DEFAULT_TOKENIZER = "builtin:kjv-sp4k"  # the Trainer's default, for a starting model without tokenizer files


def select(rewards: np.ndarray, n: int, keep: str = "best", threshold: float | None = None,
           min_reward: float | None = None, candidates: np.ndarray | None = None,
           texts: Sequence[Any] | None = None) -> list[int]:
    """The kept samples' indices (ascending) among `rewards` [N] (N = prompts * n, a prompt's n consecutive).

    keep=best: each prompt's highest reward, the first sampled on ties; keep=threshold: every sample whose
    reward is >= `threshold` (with `texts`, a text equal to an earlier kept one of the prompt once). A prompt
    whose best reward is below `min_reward` keeps nothing. NaN rewards (no function scored) and samples that
    are not `candidates` ([N] bool) are never kept."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or rewards.size % n:
        raise JaxllmError(f"select needs [prompts * n] rewards, got shape {rewards.shape} with n={n}")
    ok = ~np.isnan(rewards) if candidates is None else ~np.isnan(rewards) & np.asarray(candidates, bool)
    scores = np.where(ok, rewards, -np.inf).reshape(-1, n)
    kept: list[int] = []
    for p, row in enumerate(scores):
        best = row.max()
        if best == -np.inf or (min_reward is not None and best < min_reward):
            continue
        if keep == "best":
            kept.append(p * n + int(np.argmax(row)))  # argmax: the first of equal maxima
            continue
        seen: list[Any] = []
        for j in np.flatnonzero(row >= threshold):
            text = None if texts is None else texts[p * n + j]
            if text is not None and text in seen:
                continue
            seen.append(text)
            kept.append(p * n + int(j))
    return kept


@dataclasses.dataclass
class _State:
    params: Any


@dataclasses.dataclass
class Policy:
    """A trained model as OnlineData reads a trainer (cfg, tokenizer, mesh, rules, graphdef, state.params)."""

    cfg: Config
    tokenizer: Any
    mesh: Any
    rules: Any
    graphdef: Any
    state: _State


def load_policy(cfg: Config, path: str | Path, mesh, rules) -> Policy:
    """The model at `path` (a jaxllm run/checkpoint or a Hugging Face directory; LoRA adapters merged) as the
    round's Trainer would start from it: its tokenizer (tokenizer.path when set) with the tokens data.objective
    adds, a vocabulary grown to fit them, this config's compute dtype and attention kernel."""
    pretrained = open_pretrained(path)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    elif pretrained.tokenizer_files:
        tokenizer = load_tokenizer_from_files(pretrained.tokenizer_files)
    else:
        tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    tokenizer.add_special_tokens(tokens_to_add(cfg.data, tokenizer))
    needed = special_ids(cfg.data, tokenizer).vocab_size
    grow = grown_vocab_size(needed) if needed > pretrained.config.vocab_size else None
    frozen = load_frozen(path, mesh, rules, vocab_size=grow)
    model_cfg = dataclasses.replace(frozen.cfg, dtype=cfg.model.dtype, remat=cfg.model.remat,
                                    attention_impl=cfg.model.attention_impl)
    return Policy(dataclasses.replace(cfg, model=model_cfg), tokenizer, mesh, rules, models.model_spec(model_cfg)[0],
                  _State(frozen.params))


def round_dir(cfg: Config, r: int) -> Path:
    return Path(cfg.run_dir) / f"round-{r}"


def final_checkpoint(cfg: Config, r: int) -> Path:
    """Round r's model (round 0: train.init_from)."""
    if r == 0:
        return Path(cfg.train.init_from)
    return round_dir(cfg, r) / "checkpoints" / str(cfg.rl.best_of_n.sft_steps)


def sample_round(cfg: Config, data: OnlineData, r: int) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Round r's samples of its prompts from `data`'s model: (every sample as a row of samples.jsonl, the kept
    pairs as SFT records, the round's sampling metrics)."""
    b, n = cfg.rl.best_of_n, cfg.rl.num_generations
    for _ in range((r - 1) * b.prompts_per_round):  # the prompts of the rounds before
        next(data._prompts)
    items = [next(data._prompts) for _ in range(b.prompts_per_round)]
    per_call = (b.sample_batch_size or cfg.train.batch_size) // n
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), r)
    prompts, completions, records, ids, truncated = [], [], [], [], []
    for start in range(0, len(items), per_call):
        # every call padded to the same rows: one compiled sampling loop
        out, p, c, rec = data._sample(items[start:start + per_call], data.settings, jax.random.fold_in(key, start),
                                      per_call * n)
        prompts, completions, records = prompts + p, completions + c, records + rec
        ids += _completion_ids(out)
        truncated += [bool(t) for t in out.truncated]
    total, per = compute_rewards(data._rewards, prompts, completions, records, completion_ids=ids)
    candidates = ~np.asarray(truncated) if cfg.rl.mask_truncated_completions else None
    texts = [json.dumps(c) for c in completions]
    kept = select(total, n, b.keep, b.threshold, b.min_reward, candidates, texts)
    chosen = set(kept)
    o = cfg.data.objective
    samples = [{"prompt_index": i // n, "prompt": prompts[i], "completion": completions[i], "reward": _num(total[i]),
                "rewards": {name: _num(v[i]) for name, v in per.items()}, "truncated": truncated[i],
                "kept": i in chosen} for i in range(len(prompts))]
    sft = [{o.prompt_field: prompts[i], o.completion_field: completions[i], "reward": _num(total[i])} for i in kept]
    metrics = {**reward_metrics(total, per), "prompts": len(items), "kept": len(kept),
               "prompts_kept": len({i // n for i in kept}),
               "reward_kept": float(np.mean(total[kept])) if kept else float("nan"),
               "completions/mean_length": float(np.mean([len(i) for i in ids])),  # stop tokens counted
               "completions/clipped_ratio": float(np.mean(truncated))}
    return samples, sft, metrics


def _num(x: float) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def round_config(cfg: Config, r: int) -> Config:
    """Round r's SFT run: the kept pairs, sft_steps steps from round r-1's model, in run_dir round-r."""
    where = round_dir(cfg, r).absolute()
    return dataclasses.replace(
        cfg, run_dir=str(where),
        data=dataclasses.replace(cfg.data, sources=[SourceConfig(path=str(where / "data.jsonl"), format="jsonl")]),
        train=dataclasses.replace(cfg.train, init_from=str(final_checkpoint(cfg, r - 1)),
                                  steps=cfg.rl.best_of_n.sft_steps),
        eval=dataclasses.replace(cfg.eval, sources=[]),  # held-out prompts: scored by run_best_of_n
        rl=dataclasses.replace(cfg.rl, algorithm=None))


def run_best_of_n(cfg: Config, make_trainer: Callable[[Config], Any],
                  devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """The rounds (module docstring). `make_trainer(config)`: the one Trainer (jaxllm.train.loop.Trainer),
    given by the caller (no module of jaxllm.rl imports the loop). Returns {"rounds": {r: row written now},
    "stopped_early": a round's SFT was stopped (SIGTERM) before its last step}."""
    if jax.process_count() > 1:
        raise JaxllmError("rl.algorithm=best_of_n runs in one process for now (any number of its devices); start it "
                          "on one host")
    b = cfg.rl.best_of_n
    run_dir = ensure_writable_dir(Path(cfg.run_dir), "run_dir")
    mesh, rules = sharding.make_mesh(cfg.mesh, devices), sharding.make_rules(cfg.mesh.rules)
    logged = {row["step"] for row in read_metrics(run_dir, filename=ROUNDS)}
    loaded: list = []  # [(round, OnlineData)]: the model last loaded, reused by the next step that needs it

    def model(r: int) -> OnlineData:
        if loaded and loaded[0][0] == r:
            return loaded[0][1]
        release()
        log.info("best-of-n: loading %s", final_checkpoint(cfg, r))
        loaded.append((r, OnlineData(load_policy(cfg, final_checkpoint(cfg, r), mesh, rules))))
        return loaded[0][1]

    def release() -> None:
        while loaded:
            loaded.pop()[1].close()

    summary: dict[str, Any] = {"rounds": {}, "stopped_early": False}
    writer: MetricsWriter | None = None
    try:
        for r in range(b.rounds + 1):
            if r > 0 and not final_checkpoint(cfg, r).is_dir():
                where = round_dir(cfg, r)
                if not (where / "sampling.json").is_file():
                    samples, sft, metrics = sample_round(cfg, model(r - 1), r)
                    if not sft:
                        raise JaxllmError(f"best-of-n round {r} kept no completion of its {len(samples)} samples "
                                          "(see its samples.jsonl); lower rl.best_of_n.min_reward or threshold, or "
                                          "check rl.rewards")
                    where.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(where / "samples.jsonl", _jsonl(samples))
                    atomic_write_text(where / "data.jsonl", _jsonl(sft))
                    atomic_write_text(where / "sampling.json", json.dumps(_clean(metrics), indent=1))
                    log.info("best-of-n round %d: kept %d of %d samples (reward %.4f, kept %.4f)", r, metrics["kept"],
                             len(samples), metrics["reward"], metrics["reward_kept"])
                release()  # the sampling model's memory back before the trainer's
                trainer = make_trainer(round_config(cfg, r))
                try:
                    result = trainer.run()
                finally:
                    trainer.close()
                    del trainer
                if result["stopped_early"]:
                    log.info("best-of-n round %d stopped at step %d; run the same command again to resume", r,
                             result["end_step"])
                    summary["stopped_early"] = True
                    return summary
            if r in logged or (r == 0 and not (cfg.eval.sources and cfg.eval.at_start)):
                continue
            row = {} if r == 0 else json.loads((round_dir(cfg, r) / "sampling.json").read_text())
            if cfg.eval.sources:
                row.update(model(r).evaluate())
            writer = writer or MetricsWriter(run_dir, filename=ROUNDS)
            writer.write(r, row)
            summary["rounds"][r] = row
            log.info("best-of-n round %d: %s", r, ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                             if isinstance(v, float) and "/" not in k))
    finally:
        release()
        if writer is not None:
            writer.close()
    return summary


def _clean(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no NaN: None instead."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
