"""The peer in `jaxllm bench`: the same decoder in Hugging Face `transformers` on PyTorch, with the
same config, batch, sequence length and precision (eager, and torch.compile), SDPA attention,
AdamW and global-norm clipping like ours. Imported only when a peer is asked for."""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np

from jaxllm.bench import summary, synthetic_batch, timed
from jaxllm.config import Config, JaxllmError, ModelConfig


def _hf_model(cfg: Config, device: str):
    import torch

    return hf_causal_lm(cfg.model, device).train(), torch


def hf_causal_lm(m: ModelConfig, device: str):
    """The `transformers` causal LM of decoder config `m` (random init, float32, SDPA attention) on `device`."""
    import transformers as T

    from jaxllm.convert.registry import family_for

    if m.arch != "decoder":
        raise JaxllmError("the transformers peer benchmarks decoder (causal LM) configs")
    hf = T.AutoConfig.for_model(**family_for(m).config_to_hf(m))
    return T.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa").to(device)


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_transformers(cfg: Config, compiled: bool, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Tokens/s of forward + loss + backward + clip + AdamW on the same model and batch."""
    torch_device = "cuda" if _cuda_available() else "cpu"
    model, torch = _hf_model(cfg, torch_device)
    torch.set_num_threads(os.cpu_count() or 1)
    step_model = torch.compile(model) if compiled else model
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
                            fused=torch_device == "cuda")
    batch = synthetic_batch(cfg.model, cfg.train.batch_size, cfg.data.seq_len)
    inputs = torch.tensor(batch["inputs"], dtype=torch.long, device=torch_device)
    targets = torch.tensor(batch["targets"], dtype=torch.long, device=torch_device)
    mixed = cfg.model.dtype == "bfloat16"

    def step():
        with torch.autocast(torch_device, dtype=torch.bfloat16, enabled=mixed):
            logits = step_model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def synced_step():
        loss = step()
        _sync(torch, torch_device)
        return loss

    # bench's own timer, so both sides are timed alike: the first step (torch.compile compiles there), warm-up
    (first_step_s,) = timed(synced_step, 0, 1)
    timed(synced_step, warmup, 0)
    if torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(synced_step, 0, steps)
    out = summary(times, cfg.train.batch_size * cfg.data.seq_len)
    out.update(first_step_s=first_step_s, final_loss=synced_step().item(), torch=torch.__version__)
    if torch_device == "cuda":
        out["peak_memory_bytes"] = {"peak_bytes_in_use": torch.cuda.max_memory_allocated(), "source": "torch.cuda"}
        del model, step_model, opt
        torch.cuda.empty_cache()
    return out


def bench_transformers_generate(cfg: Config, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64):
    torch_device = "cuda" if _cuda_available() else "cpu"
    model, torch = _hf_model(cfg, torch_device)
    model.eval()
    if cfg.model.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    prompts = torch.tensor(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, prompt_len)),
                           device=torch_device)

    def run(n):
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(torch, torch_device)

    prefill = statistics.median(timed(lambda: run(1), 1, 3))
    full = statistics.median(timed(lambda: run(new_tokens), 1, 3))
    if torch_device == "cuda":
        del model
        torch.cuda.empty_cache()
    return {"prefill_tokens_per_sec": batch * prompt_len / prefill,
            "decode_tokens_per_sec": batch * (new_tokens - 1) / max(full - prefill, 1e-9)}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
