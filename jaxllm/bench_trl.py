"""The TRL peers of `jaxllm bench --peer trl`: a post-training step of TRL's own trainers (transformers +
torch) on the same model shapes, global batch, sequence length, examples and precision as jaxllm's step.

- SFT: `trl.SFTTrainer` on the examples of the jaxllm SFT batch (`bench_batches.synthetic_examples`), pre-tokenized
  with a completion mask (`completion_only_loss`: the loss on the completions, like an assistant-only
  loss), either packed as TRL recommends (`packing="bfd"`: best-fit-decreasing packing, padding-free,
  sequences told apart by position_ids) or padded per example (`packing="padded"`).
- Distillation: `trl.experimental.gkd.GKDTrainer` with `lmbda=0` and `seq_kd=False` (off-policy: the
  teacher scores the dataset's tokens, as a logit-distillation step of jaxllm does; TRL's
  `DistillationTrainer` always generates on-policy first), its generalised JSD with beta and temperature;
  examples padded per example (GKD does not pack).
- DPO: `trl.DPOTrainer` on the pairs of jaxllm's DPO batch (`bench_batches.synthetic_pairs`), fed as the
  pre-tokenized columns its collator reads (`prompt_ids`, `chosen_ids`, `rejected_ids`; its text
  `_prepare_dataset` is skipped), the config's `preference.beta`/`loss_type`/`label_smoothing`, a reference
  model that is a copy of the (random-init) policy, as jaxllm's bench reference is of its policy.

Each trainer runs `train()` for warm-up + measured optimizer steps; a callback times each step from the
end of the previous one, so a step includes what a user's run pays per step: the data loader and
collator, TRL's per-step metrics (SFT: token accuracy, entropy), logging. Imported only when asked for;
torch, transformers, datasets and trl are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from typing import Any

import numpy as np

from jaxllm.bench import summary
from jaxllm.bench_batches import PAIR_OBJECTIVES, check_segments, synthetic_examples, synthetic_pairs
from jaxllm.bench_peer import _cuda_available, hf_causal_lm
from jaxllm.config import Config, JaxllmError, ModelConfig

SFT_PACKINGS = ("bfd", "padded")


class PeakRSS:
    """The process's resident memory sampled every `interval` s in a thread: `peak - start` is how far it rose
    while the block ran (torch's CPU allocations are not Python's, so tracemalloc would not see them)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..V-1 (token `tI` is id I; pad 0, eos 1): TRL's trainers need one for
    their padding and end ids; the data is pre-tokenized."""
    import transformers as T
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                     pad_token="t0", eos_token="t1")


def _records(cfg: Config, steps: int, segments: int) -> list[dict[str, list[int]]]:
    """The jaxllm SFT batch's examples for `steps` batches: an example of n + 1 tokens is jaxllm's n
    positions; TRL gets its first n tokens (it shifts inside, so it predicts n - 1 of them: one fewer per
    example than jaxllm, the end-of-turn target), completion_mask 1 on the completion."""
    rows = synthetic_examples(cfg.model.vocab_size, cfg.train.batch_size * steps, cfg.data.seq_len, segments)
    return [{"input_ids": tokens[:-1].tolist(), "completion_mask": [0] * prompt + [1] * (len(tokens) - 1 - prompt)}
            for row in rows for tokens, prompt in row]


def _training_args(cls, cfg: Config, per_device_batch: int, max_steps: int, out_dir: str, **extra):
    o, cuda = cfg.optim, _cuda_available()
    if "dataset_num_proc" in {f.name for f in dataclasses.fields(cls)}:  # the SFT/DPO configs have it, GRPO's not
        extra = {"dataset_num_proc": None, **extra}
    return cls(
        output_dir=out_dir, per_device_train_batch_size=per_device_batch, max_steps=max_steps,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip or 0.0, lr_scheduler_type="constant",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cfg.model.dtype == "bfloat16",  # TRL defaults to bf16 autocast; follow the config's compute dtype
        # TRL 1.x's configs default to gradient checkpointing; recompute activations only when jaxllm does
        gradient_checkpointing=cfg.model.remat != "none",
        use_cpu=not cuda, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        **extra,
    )


def _run(trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Runs `trainer.train()` for warmup + steps optimizer steps; each step timed from the end of the one before.
    Tokens are counted as the collator hands them over (padding excluded): TRL's BFD packing leaves some room
    in its rows, so a step may hold fewer than batch x seq_len."""
    import torch
    import transformers as T

    ends: list[float] = []
    compute: list[float] = []
    tokens: list[int] = []
    collate = trainer.data_collator

    def counted(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted  # the train dataloader is built inside train(), with this collator

    class StepTimer(T.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if _cuda_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            compute.append(ends[-1] - self.begin)

    trainer.add_callback(StepTimer())
    cuda = _cuda_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        output = trainer.train()
    times = list(np.diff(ends[warmup - 1:])) if warmup else [ends[0] - start, *np.diff(ends)]
    # One batch per step, in order (the data loader may collate one ahead: those come last).
    tokens_per_step = float(np.mean(tokens[len(ends) - steps:len(ends)]))
    out = summary(times[-steps:], tokens_per_step)
    out.update(
        compute_time_median=float(np.median(compute[-steps:])), first_step_s=ends[0] - start,
        tokens_per_step=tokens_per_step, final_loss=float(output.training_loss),
        peak_memory_bytes={"peak_bytes_in_use": torch.cuda.max_memory_allocated(), "source": "torch.cuda"} if cuda
        else {"peak_bytes_in_use": rss.peak - rss.start,
              "source": "resident memory the process gained while training (sampled)"},
    )
    return out


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def bench_trl_sft(cfg: Config, warmup: int = 3, steps: int = 10, packing: str = "bfd",
                  segments: int = 4) -> dict[str, Any]:
    """Tokens/s of TRL's SFTTrainer step on the examples of jaxllm's SFT batch (module docstring)."""
    if packing not in SFT_PACKINGS:
        raise JaxllmError(f"TRL SFT packing {packing!r}: choose one of {', '.join(SFT_PACKINGS)}")
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    warmup, device = max(warmup, 1), "cuda" if _cuda_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_causal_lm(cfg.model, device)
    records = _records(cfg, warmup + steps, segments)
    bfd = packing == "bfd"
    rows_per_step = cfg.train.batch_size if bfd else cfg.train.batch_size * segments
    with tempfile.TemporaryDirectory() as out_dir:
        args = _training_args(SFTConfig, cfg, rows_per_step, warmup + steps, out_dir, packing=bfd,
                              packing_strategy="bfd", padding_free=bfd, max_length=cfg.data.seq_len,
                              completion_only_loss=True, shuffle_dataset=False, logging_steps=10)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=_tokenizer(cfg.model.vocab_size))
        out = _run(trainer, warmup, steps)
    out.update(packing=packing, attention=model.config._attn_implementation, **_versions())
    return out


class _PadPerExample:
    """GKD's batches: each example padded to the batch's longest, labels -100 on the prompt and the padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, e in enumerate(examples):
            n, tokens = len(e["input_ids"]), torch.tensor(e["input_ids"])
            ids[i, :n], mask[i, :n] = tokens, 1
            labels[i, :n] = torch.where(torch.tensor(e["completion_mask"]) > 0, tokens, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bench_trl_distill(cfg: Config, teacher: ModelConfig, warmup: int = 3, steps: int = 10, beta: float = 0.5,
                      temperature: float = 1.0, segments: int = 4) -> dict[str, Any]:
    """Tokens/s of TRL's GKDTrainer step (lmbda=0: off-policy logit distillation) with a `teacher` of these
    shapes (random init) on the examples of jaxllm's SFT batch (module docstring)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    if teacher.vocab_size != cfg.model.vocab_size:
        raise JaxllmError(f"the teacher's vocab_size {teacher.vocab_size} is not the student's "
                          f"{cfg.model.vocab_size}: TRL's GKD compares whole distributions of one vocabulary")
    warmup, device = max(warmup, 1), "cuda" if _cuda_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model, teacher_model = hf_causal_lm(cfg.model, device), hf_causal_lm(teacher, device)
    if teacher.dtype == "bfloat16" or teacher.param_dtype == "bfloat16":
        teacher_model = teacher_model.to(torch.bfloat16)
    tokenizer = _tokenizer(cfg.model.vocab_size)
    with tempfile.TemporaryDirectory() as out_dir:
        args = _training_args(GKDConfig, cfg, cfg.train.batch_size * segments, warmup + steps, out_dir, lmbda=0.0,
                              seq_kd=False, beta=beta, temperature=temperature, max_length=cfg.data.seq_len,
                              logging_steps=10)
        trainer = GKDTrainer(model=model, teacher_model=teacher_model, args=args,
                             train_dataset=datasets.Dataset.from_list(_records(cfg, warmup + steps, segments)),
                             processing_class=tokenizer, data_collator=_PadPerExample(tokenizer.pad_token_id))
        out = _run(trainer, warmup, steps)
    out.update(beta=beta, temperature=temperature, attention=model.config._attn_implementation, **_versions())
    return out


def _pair_records(cfg: Config, steps: int, segments: int) -> list[dict[str, list[int]]]:
    """The pairs of jaxllm's DPO batch for `steps` batches, in order, as TRL's pre-tokenized columns: the
    collator makes prompt + chosen and prompt + rejected of them, the same tokens jaxllm's rows hold."""
    rows = synthetic_pairs(cfg.model.vocab_size, cfg.train.batch_size * steps, cfg.data.seq_len, segments)
    return [{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
            for row in rows for p, c, r in row]


def _dpo_trainer_class():
    """`trl.DPOTrainer` taking its dataset pre-tokenized (no text `_prepare_dataset`: the collator reads the
    ids), recording each step's loss (a device tensor, read after training: no extra synchronisation)."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        step_losses: list

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.step_losses.append((out[0] if return_outputs else out).detach())
            return out

    return PreTokenizedDPOTrainer


def bench_trl_dpo(cfg: Config, warmup: int = 3, steps: int = 10, segments: int = 4) -> dict[str, Any]:
    """Tokens/s of TRL's DPOTrainer step on the pairs of jaxllm's DPO batch (module docstring): as many pairs
    per step as jaxllm's global batch holds, each sequence padded to the batch's longest (TRL's collator)."""
    import copy

    import datasets
    import torch
    from trl import DPOConfig

    p = cfg.preference
    warmup, device = max(warmup, 1), "cuda" if _cuda_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_causal_lm(cfg.model, device)
    reference = copy.deepcopy(model).eval()  # equal to the policy at the start, as jaxllm's bench reference
    if p.reference_dtype == "bfloat16":
        reference = reference.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as out_dir:
        args = _training_args(DPOConfig, cfg, cfg.train.batch_size * segments, warmup + steps, out_dir,
                              beta=p.beta, loss_type=[p.loss_type], label_smoothing=p.label_smoothing,
                              max_length=cfg.data.seq_len, train_sampling_strategy="sequential", logging_steps=10)
        cls = _dpo_trainer_class()
        trainer = cls(model=model, ref_model=reference, args=args,
                      train_dataset=datasets.Dataset.from_list(_pair_records(cfg, warmup + steps, segments)),
                      processing_class=_tokenizer(cfg.model.vocab_size))
        trainer.step_losses = []
        out = _run(trainer, warmup, steps)
    out.update(first_loss=float(trainer.step_losses[0]), beta=p.beta, loss_type=p.loss_type,
               pairs_per_step=cfg.train.batch_size * segments, attention=model.config._attn_implementation,
               **_versions())
    return out


# ------------------------------------------------------------------------------- jaxllm next to TRL

TEACHER = "teacher"  # an objective whose frozen models include this one is benchmarked against TRL's GKD
DPO = "dpo"  # this objective is benchmarked against TRL's DPOTrainer


def with_objective(cfg: Config, name: str) -> Config:
    """`cfg` with data.objective.name = `name` (everything else as it was)."""
    objective = dataclasses.replace(cfg.data.objective, name=name)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, objective=objective))


def frozen_model_config(source) -> ModelConfig:
    """The model config of a frozen model's source (a Hugging Face directory or a jaxllm run or checkpoint),
    read without its weights: TRL's peer builds the same shapes before JAX takes the device's memory."""
    from jaxllm.train.frozen import open_pretrained

    if not os.path.exists(source.path):
        raise JaxllmError(f"the frozen model {source.path} does not exist: train or convert it first, or point the "
                          "config at one")
    m = open_pretrained(source.path).config
    return dataclasses.replace(m, param_dtype=source.param_dtype) if source.param_dtype else m


def distill_loss(cfg: Config) -> tuple[float, float]:
    """(beta, temperature) of the config's `distill` section, named as TRL's (beta 0: forward KL, 1: reverse
    KL, between: generalised JSD); GKD's defaults (0.5, 1.0) for an objective without one."""
    d = getattr(cfg, "distill", None)
    return float(getattr(d, "beta", 0.5)), float(getattr(d, "temperature", 1.0))


def check_installed() -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "datasets", "trl") if importlib.util.find_spec(m) is None]
    if missing:
        raise JaxllmError(f"--peer trl runs TRL's trainers, which need {', '.join(missing)}: "
                          "pip install -e '.[test]' (trl==1.16.0, torch, transformers, datasets)")


def bench_post_training(cfg: Config, warmup: int = 3, steps: int = 10, packings: tuple[str, ...] = ("bfd",),
                        segments: int = 4) -> dict[str, Any]:
    """Rows of `jaxllm bench --peer trl`: TRL's SFT step (and GKD's, when the config's objective has a
    teacher; DPOTrainer's, when it is dpo) next to jaxllm's pretraining (clm) step, SFT step and the config's
    own objective's step on the same model, global batch and sequence length. A TRL row's `compare_to` names
    its jaxllm row; its MFU uses that row's FLOPs per token and peak. TRL runs first: JAX keeps a GPU's memory
    once it has it."""
    from jaxllm import bench
    from jaxllm.train.objective import check_trainable

    objective = check_trainable(cfg)
    if objective.online is not None:
        raise JaxllmError(f"{cfg.data.objective.name} trains on rollouts: its TRL peer is jaxllm.bench_rl.bench_online")
    name = cfg.data.objective.name
    check_segments(segments, cfg.data.seq_len, pairs=name in PAIR_OBJECTIVES)
    check_installed()
    sources = objective.frozen_models(cfg)
    teacher = frozen_model_config(sources[TEACHER]) if TEACHER in sources else None  # before any peer runs
    cfg = bench.start_from(cfg)  # the trained model's shapes, as the Trainer takes them from train.init_from
    methods = {"jaxllm pretraining (clm)": (with_objective(cfg, "clm"), False),
               "jaxllm sft": (with_objective(cfg, "sft"), True)}
    own = f"jaxllm {name}"
    if name not in ("clm", "sft"):  # distillation learns from the SFT batch's examples, dpo from the DPO batch's pairs
        methods[own] = (cfg, True if teacher is not None else None)
    results: dict[str, Any] = {}
    for packing in packings:
        results[f"TRL SFTTrainer ({packing})"] = dict(
            bench_trl_sft(cfg, warmup, steps, packing, segments), compare_to="jaxllm sft")
    if teacher is not None:
        beta, temperature = distill_loss(cfg)
        results["TRL GKDTrainer (lmbda=0)"] = dict(
            bench_trl_distill(cfg, teacher, warmup, steps, beta, temperature, segments), compare_to=own)
    if name == DPO:
        results["TRL DPOTrainer"] = dict(bench_trl_dpo(cfg, warmup, steps, segments), compare_to=own)
    if results and _cuda_available():  # the trainers hold reference cycles: free their GPU memory for JAX
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    ours = {}
    for name, (method_cfg, packed) in methods.items():
        setup = bench.setup(method_cfg, packed=packed, segments=segments)
        ours[name] = bench.bench_train(setup, warmup, steps)
        del setup  # its state leaves the devices before the next one's
    for row in results.values():
        pair = ours[row["compare_to"]]
        achieved = row["tokens_per_sec"] / pair["peak_flops_per_device"]  # one process, one device
        row.update(flops_per_token=pair["flops_per_token"], mfu=pair["flops_per_token"] * achieved,
                   mfu_causal=pair["flops_per_token_causal"] * achieved)
    return {**ours, **results}
