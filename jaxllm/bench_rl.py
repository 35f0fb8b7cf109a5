"""`jaxllm bench CONFIG --peer trl` for an online RL config (data.objective.name grpo): a full GRPO cycle of
jaxllm (rollout from the live parameters, rewards, the scoring pass, advantages, the update) next to
`trl.GRPOTrainer`'s on the same model shapes, prompts, group size and batch (docs/post-training.md, "Online RL:
speed and scale").

What is equal on both sides:
- the prompts: the token ids jaxllm's prompt pipeline makes of data.sources (its tokenizer, chat template), handed
  to TRL as the words `[ID]` of a whitespace word-level tokenizer, which encodes them to the same ids (checked:
  each row's `same_prompts`);
- the model shapes (the trained model's: train.init_from's when it exists, `bench.start_from`); jaxllm trains
  from init_from's weights when it exists, TRL from a random init of those shapes (the work per step is the same);
- the work: every completion is exactly rl.max_new_tokens long. jaxllm samples with no stop ids (the rollout
  settings' stop_ids emptied), TRL with generation_kwargs min_new_tokens = max_completion_length (EOS masked);
- TRL's settings from the rl section: num_generations, max_completion_length = max_new_tokens, temperature,
  top_k, top_p, beta, epsilon(_high), loss_type, scale_rewards, importance_sampling_level,
  mask_truncated_completions, num_iterations = epochs, per_device_train_batch_size x gradient_accumulation_steps
  = train.batch_size, steps_per_generation = minibatches x grad_accum (one rollout = batch_size x minibatches
  completions on both sides), the optimizer (`bench_trl._training_args`), bf16 as model.dtype;
- the reward: `token_share`, the same Python function for both (the share of a completion's token ids that are
  even: it varies within a group, so advantages are not zero). rl.dynamic_sampling is off (no extra rollouts).

A cycle is one rollout and its rl.epochs x rl.minibatches updates. Timed: warm-up cycles, then `steps` cycles,
each from the end of the one before; samples/s = completions per second. The rollout's share is the time spent
sampling (jaxllm's `rollout`, TRL's `_generate`) over the cycle; `prepare_share` adds rewards, the scoring pass
(old/reference log-probs) and advantages (jaxllm's `next_batch`, TRL's `_generate_and_score_completions`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxllm.config import Config, JaxllmError, RewardSpec

REWARD = "jaxllm.bench_rl:token_share"
BENCHED = ("grpo",)  # objectives with a TRL peer (TRL's RLOO and PPO trainers differ in their loops: not yet)


def token_share(prompts, completions, completion_ids=None, **fields) -> list[float]:
    """The bench's reward, for jaxllm and TRL alike: the share of even token ids in each completion."""
    return [sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def bench_config(cfg: Config, run_dir: str) -> Config:
    """`cfg` as the bench trains it: the bench's reward, no dynamic sampling, no evaluation, no checkpoints in
    the timed steps, `run_dir` a scratch directory; train.init_from dropped when it does not exist (the config's
    model section, random init)."""
    from jaxllm import bench

    r, t = cfg.rl, cfg.train
    never = _cycle_steps(cfg) * 10**6  # train.steps and checkpoint.every stay multiples of a cycle's updates
    init_from = t.init_from if t.init_from and os.path.exists(t.init_from) else None
    if t.init_from and init_from is None:
        bench.start_from(cfg)  # says once that the config's model section is measured
    return dataclasses.replace(
        cfg, run_dir=run_dir,
        rl=dataclasses.replace(r, rewards=[RewardSpec(REWARD)], dynamic_sampling=False),
        train=dataclasses.replace(t, init_from=init_from, steps=never, sample_prompt=None),
        eval=dataclasses.replace(cfg.eval, sources=[], tasks=[], at_start=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=never))


def _cycle_steps(cfg: Config) -> int:
    return cfg.rl.epochs * cfg.rl.minibatches


def _rates(cfg: Config, times: list[float], sampling: list[float], preparing: list[float], prompt_tokens: float
           ) -> dict[str, Any]:
    """The row of one side from its cycle times: samples/s, completion tokens/s (the table's tokens/s) and the
    rollout's shares; `prompt_tokens`: mean prompt tokens per completion (for the FLOPs)."""
    r, B = cfg.rl, cfg.train.batch_size
    completions = B * r.minibatches  # per cycle
    med = statistics.median(times)
    steps = _cycle_steps(cfg)
    p90 = sorted(times)[max(int(np.ceil(0.9 * len(times))) - 1, 0)]
    return {
        "samples_per_sec": completions / med, "tokens_per_sec": completions * r.max_new_tokens / med,
        "cycle_time_median": med, "step_time_median": med / steps, "step_time_p90": p90 / steps,
        "rollout_share": statistics.median(s / c for s, c in zip(sampling, times)),
        "prepare_share": statistics.median(p / c for p, c in zip(preparing, times)),
        "rollout_tokens_per_sec": completions * r.max_new_tokens / statistics.median(sampling),
        "completions_per_cycle": completions, "updates_per_cycle": steps, "cycles": len(times),
        "completion_tokens": r.max_new_tokens, "prompt_tokens_mean": prompt_tokens,
    }


def cycle_flops(cfg: Config, prompt_tokens: float) -> float:
    """The model FLOPs one cycle needs (the work of the algorithm, not of an implementation: each prompt counted
    once per group, as rollouts and a shared prefix run it; the scoring pass only when the updates read it):
    sampling and the scoring pass are forwards (a third of `flops_per_token`) of the prompts and completions, the
    updates forward and backward passes, every epoch. Attention at data.seq_len, as `bench.step_flops_per_token`;
    `prompt_tokens`: the mean prompt length."""
    from jaxllm.plan.estimate import flops_per_token
    from jaxllm.rl.online import needs_reference, on_policy

    r = cfg.rl
    completions = cfg.train.batch_size * r.minibatches
    tokens = completions / r.num_generations * prompt_tokens + completions * r.max_new_tokens
    scoring = int(not on_policy(cfg) or cfg.data.objective.name == "ppo") + int(needs_reference(cfg))
    return tokens * flops_per_token(cfg.model, cfg.data.seq_len) * ((1 + scoring) / 3 + r.epochs)


# ------------------------------------------------------------------------------------------------- jaxllm


def _trainer(cfg: Config):
    """The one Trainer on the bench config, its rollouts sampling exactly max_new_tokens (no stop ids)."""
    from jaxllm.train.loop import Trainer

    trainer = Trainer(cfg)
    trainer.data.settings = dataclasses.replace(trainer.data.settings, stop_ids=())
    return trainer


def prompt_ids(trainer, count: int) -> list[list[int]]:
    """The first `count` prompts the trainer's rollouts will use, as token ids (a second pipeline of the same
    sources, seed and shuffle: the same order)."""
    from jaxllm.rl.prompts import prompt_pipeline

    data = trainer.data
    pipeline = prompt_pipeline(trainer.cfg, trainer.cfg.data.sources, data._encode, None, shuffle=True)
    try:
        return [[int(i) for i in next(pipeline)["ids"]] for _ in range(count)]
    finally:
        pipeline.close()


def bench_jaxllm_grpo(trainer, warmup: int, steps: int, prompts: list[list[int]]) -> dict[str, Any]:
    """Cycles of the trainer's own loop body (`next_batch` + `train_step`, as `Trainer.run`), timed; `prompts`:
    the ones it will sample from (`prompt_ids`), checked."""
    from jaxllm import bench
    from jaxllm.bench_trl import PeakRSS

    cfg, data = trainer.cfg, trainer.data
    sampling: list[float] = []
    sampled: list[list[int]] = []  # the prompts of the rollouts, one per group
    real_sample = data._sample

    def timed_sample(items, *args, **kwargs):  # the rollout itself (decode loop and the texts for the rewards)
        sampled.extend([int(i) for i in it["ids"]] for it in items)
        t = time.perf_counter()
        out = real_sample(items, *args, **kwargs)
        sampling.append(time.perf_counter() - t)
        return out

    data._sample = timed_sample
    times, preparing, losses, lengths = [], [], [], set()
    with PeakRSS() as rss:
        for cycle in range(warmup + steps):
            start, prepare = time.perf_counter(), 0.0
            for _ in range(_cycle_steps(cfg)):
                t = time.perf_counter()
                batch = trainer.next_batch()
                prepare += time.perf_counter() - t
                lengths |= set(np.asarray(batch["loss_mask"]).sum(1).astype(int).tolist())  # completion tokens
                losses.append(jax.block_until_ready(trainer.train_step(batch))["loss"])
            times.append(time.perf_counter() - start)
            preparing.append(prepare)
    data._sample = real_sample
    out = _rates(cfg, times[warmup:], sampling[warmup:], preparing[warmup:], float(np.mean([len(p) for p in prompts])))
    device = trainer.mesh.devices.flatten()[0]
    peak, source = bench.device_peak_flops(device)
    out.update(
        objective=cfg.data.objective.name, devices=trainer.mesh.devices.size, device_kind=device.device_kind,
        completion_lengths=sorted(lengths), first_loss=float(losses[0]), final_loss=float(losses[-1]),
        first_cycle_s=times[0], peak_flops_per_device=peak, peak_source=source,
        peak_memory_bytes={"peak_bytes_in_use": rss.peak - rss.start,
                           "source": "resident memory the process gained while training (sampled)"},
        init_from=cfg.train.init_from, same_prompts=sampled == prompts)
    return out


# ------------------------------------------------------------------------------------------------- TRL


def word_tokenizer(vocab_size: int):
    """Words `[ID]` -> id ID (whitespace-split; pad [0], eos [1]): prompts written as these words (`as_words`)
    tokenize to the ids jaxllm's tokenizer gave them. Brackets, because special tokens are matched inside words
    first: with words t<ID>, eos `t1` would split `t128` into `t1` `28`."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"[{i}]": i for i in range(vocab_size)}, unk_token="[0]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[0]", eos_token="[1]")


def as_words(ids) -> str:
    """Token ids as the text `word_tokenizer` encodes back to them."""
    return " ".join(f"[{int(i)}]" for i in ids)


def _grpo_trainer_class():
    """`trl.GRPOTrainer` recording the time of each rollout's sampling (`_generate`) and of its whole
    preparation (`_generate_and_score_completions`: sampling, rewards, old/reference log-probs, advantages)."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        sampling: list
        preparing: list
        sampled: list  # (prompt ids, completion length) of each completion

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.sampling.append(time.perf_counter() - t)
            self.sampled += [(list(map(int, p)), len(c)) for p, c in zip(out[0], out[1])]
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.preparing.append(time.perf_counter() - t)
            return out

    return TimedGRPOTrainer


def bench_trl_grpo(cfg: Config, prompts: list[list[int]], warmup: int, steps: int) -> dict[str, Any]:
    """Cycles of TRL's GRPOTrainer on `prompts` (token ids; module docstring), timed from the end of the one
    before by a callback at each optimizer step."""
    import datasets
    import torch
    import transformers as T
    from trl import GRPOConfig

    from jaxllm.bench_peer import _cuda_available, hf_causal_lm
    from jaxllm.bench_trl import PeakRSS, _training_args, _versions

    r, t = cfg.rl, cfg.train
    device = "cuda" if _cuda_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_causal_lm(cfg.model, device)
    tokenizer = word_tokenizer(cfg.model.vocab_size)
    per_step = _cycle_steps(cfg)
    dataset = datasets.Dataset.from_list([{"prompt": as_words(p)} for p in prompts])
    ends: list[float] = []

    class CycleTimer(T.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = _training_args(
            GRPOConfig, cfg, t.batch_size // t.grad_accum, (warmup + steps) * per_step, out_dir,
            gradient_accumulation_steps=t.grad_accum, steps_per_generation=r.minibatches * t.grad_accum,
            num_iterations=r.epochs, num_generations=r.num_generations, max_completion_length=r.max_new_tokens,
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, beta=_beta(cfg), epsilon=r.epsilon,
            epsilon_high=r.epsilon_high, loss_type=r.loss_type, scale_rewards=r.scale_rewards,
            importance_sampling_level=r.importance_sampling_level,
            mask_truncated_completions=r.mask_truncated_completions, shuffle_dataset=False, use_vllm=False,
            generation_kwargs={"min_new_tokens": r.max_new_tokens}, logging_steps=10)
        trainer = _grpo_trainer_class()(model=model, reward_funcs=[token_share], args=args, train_dataset=dataset,
                                        processing_class=tokenizer)
        trainer.sampling, trainer.preparing, trainer.sampled = [], [], []
        trainer.add_callback(CycleTimer())
        with PeakRSS() as rss:
            start = time.perf_counter()
            output = trainer.train()
    cycle_ends = [start] + ends[per_step - 1::per_step]
    times = list(np.diff(cycle_ends))
    out = _rates(cfg, times[warmup:], trainer.sampling[warmup:], trainer.preparing[warmup:],
                 float(np.mean([len(p) for p in prompts])))
    n = r.num_generations
    out.update(first_cycle_s=times[0], final_loss=float(output.training_loss),
               same_prompts=[p for p, _ in trainer.sampled] == [p for p in prompts for _ in range(n)],
               completion_lengths=sorted({length for _, length in trainer.sampled}),
               peak_memory_bytes={"peak_bytes_in_use": rss.peak - rss.start,
                                  "source": "resident memory the process gained while training (sampled)"},
               attention=model.config._attn_implementation, **_versions())
    return out


def _beta(cfg: Config) -> float:
    from jaxllm.rl.objectives import beta

    return beta(cfg)


# ------------------------------------------------------------------------------------------------- side by side

JAXLLM_ROW = "jaxllm grpo (rollout + update)"
TRL_ROW = "TRL GRPOTrainer (transformers generate)"


def bench_online(cfg: Config, warmup: int = 2, steps: int = 5) -> dict[str, Any]:
    """The rows of `jaxllm bench --peer trl` for a grpo config (module docstring): TRL first, then jaxllm on the
    same prompts; each row's MFU from the cycle's model FLOPs (`cycle_flops`) and jaxllm's device peak."""
    from jaxllm.bench_trl import check_installed

    name = cfg.data.objective.name
    if name not in BENCHED:
        raise JaxllmError(f"--peer trl measures online RL against TRL's GRPOTrainer (grpo); {name} has no TRL peer "
                          "here yet: bench it with data.objective.name=grpo")
    check_installed()
    warmup = max(warmup, 1)
    groups = cfg.train.batch_size * cfg.rl.minibatches // cfg.rl.num_generations
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _trainer(bench_config(cfg, run_dir))
        try:
            prompts = prompt_ids(trainer, (warmup + steps) * groups)
            rows = {TRL_ROW: dict(bench_trl_grpo(trainer.cfg, prompts, warmup, steps), compare_to=JAXLLM_ROW)}
            rows = {JAXLLM_ROW: bench_jaxllm_grpo(trainer, warmup, steps, prompts), **rows}
        finally:
            trainer.data.close()
            trainer.close()
    ours = rows[JAXLLM_ROW]
    for row in rows.values():
        flops = cycle_flops(trainer.cfg, row["prompt_tokens_mean"])
        row.update(mfu=flops / row["cycle_time_median"] / ours["peak_flops_per_device"] / ours["devices"])
        row["mfu_causal"] = row["mfu"]  # one convention: attention at the row width (cycle_flops)
    rows[TRL_ROW]["samples_per_sec_ratio"] = ours["samples_per_sec"] / rows[TRL_ROW]["samples_per_sec"]
    return rows


def format_online(rows: dict[str, Any]) -> str:
    """Lines under the table: samples/s, the rollout's share and rollout tokens/s of each side."""
    lines = []
    for name, r in rows.items():
        if isinstance(r, dict) and "samples_per_sec" in r:
            lines.append(f"{name}: {r['samples_per_sec']:.1f} samples/s ({r['completions_per_cycle']} completions x "
                         f"{r['completion_tokens']} tokens per cycle of {r['updates_per_cycle']} update(s)), "
                         f"rollout {100 * r['rollout_share']:.0f}% of the cycle (with rewards, scoring and advantages "
                         f"{100 * r['prepare_share']:.0f}%), sampling {r['rollout_tokens_per_sec']:,.0f} tokens/s")
    return "\n".join(lines)
