"""Sequence-level knowledge distillation data: a teacher's completions of prompts, as jsonl.

Each line is `{"prompt": ..., "completion": ..., "text": prompt + completion}`: the SFT objective reads
prompt/completion (loss on the completion), the clm objective reads `text`. Prompts are records of any
data source (`SourceConfig`: files, `builtin:`, `hf:`), whole or cut to their first `prompt_tokens`
tokens (for plain corpora: "continue this verse"). Generation is the batched KV-cache sampler of
infer/generate.py on the teacher's parameters; one compile per distinct (batch, prompt length) shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jax

from jaxllm.config import GenerateConfig, JaxllmError, SourceConfig
from jaxllm.data.sources import make_source
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.infer.generate import generate_text
from jaxllm.infer.load import LoadedModel
from jaxllm.utils import atomic_write_text


def prompts_from_source(source: SourceConfig, tokenizer: Tokenizer, limit: int, prompt_tokens: int) -> list[str]:
    """Up to `limit` prompts: each record's text, or its first `prompt_tokens` tokens (records with no more
    tokens than that, which leave nothing to continue, are skipped)."""
    prompts = []
    for record in make_source(source, num_epochs=1):
        text = record["text"]
        if prompt_tokens:
            ids = tokenizer.encode(text)
            if len(ids) <= prompt_tokens:
                continue
            text = tokenizer.decode(ids[:prompt_tokens])
        if text.strip():
            prompts.append(text)
        if len(prompts) == limit:
            break
    if not prompts:
        raise JaxllmError(f"no prompts from {source.path} (field {source.text_field}); check the path and "
                          "--field, or lower --prompt-tokens")
    return prompts


def teacher_completions(teacher: LoadedModel, prompts: list[str], gen: GenerateConfig,
                        batch_size: int) -> Iterator[dict[str, str]]:
    """`{"prompt", "completion", "text"}` for each prompt (gen.num_return_sequences of them), generated
    `batch_size` prompts at a time."""
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        texts = generate_text(teacher.graphdef, teacher.params, teacher.config, teacher.tokenizer, batch, gen)
        for i, completion in enumerate(texts):
            prompt = batch[i // gen.num_return_sequences]
            yield {"prompt": prompt, "completion": completion, "text": prompt + completion}


def write_completions(teacher: LoadedModel, source: SourceConfig, out: str | Path, gen: GenerateConfig, *,
                      limit: int, prompt_tokens: int, batch_size: int) -> int:
    """Writes the teacher's completions of `source`'s prompts to `out` (jsonl, atomically, from process 0;
    every process takes part in generating); returns the count."""
    if teacher.config.model.arch != "decoder":
        raise JaxllmError("sequence-level distillation needs a decoder teacher (it continues prompts); "
                          f"this checkpoint is a model.arch={teacher.config.model.arch}")
    if teacher.tokenizer is None:
        raise JaxllmError("the teacher's checkpoint carries no tokenizer; pass --tokenizer PATH")
    prompts = prompts_from_source(source, teacher.tokenizer, limit, prompt_tokens)
    lines = [json.dumps(row, ensure_ascii=False) for row in teacher_completions(teacher, prompts, gen, batch_size)]
    if jax.process_index() == 0:
        atomic_write_text(Path(out), "\n".join(lines) + "\n")
    return len(lines)
