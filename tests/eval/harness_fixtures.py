"""A tiny random transformers Llama with a real tokenizer (the built-in SentencePiece one, exported as
tokenizer.json that prepends BOS), and three local lm-evaluation-harness tasks: multiple choice (acc,
acc_norm), document perplexity (loglikelihood_rolling: word/byte perplexity, bits per byte) and generation
(generate_until with stop sequences, exact_match). No network."""

from __future__ import annotations

import json
from pathlib import Path


QUESTIONS = [
    ("In the beginning God created the heaven and the", ["earth", "sea", "light", "night"], 0),
    ("And God said, Let there be", ["darkness", "light", "water"], 1),
    ("The LORD is my shepherd; I shall not", ["want", "sing", "run", "sleep"], 0),
    ("Blessed are the meek: for they shall inherit the", ["earth", "kingdom"], 0),
    ("And the evening and the morning were the first", ["night", "day", "year"], 1),
    ("Thou shalt love thy neighbour as", ["thyself", "thy brother", "the stranger"], 0),
]
DOCUMENTS = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness. And God called the "
    "light Day, and the darkness he called Night. And the evening and the morning were the first day. And God "
    "said, Let there be a firmament in the midst of the waters, and let it divide the waters from the waters.",
]
PROMPTS = [("And God said, Let there", "be light"), ("The LORD is my", "shepherd"), ("Blessed are the", "meek"),
           ("In the beginning", "God"), ("Thou shalt not", "kill")]


def tiny_llama_dir(path: Path, max_positions: int = 64) -> Path:
    """A random-initialised LlamaForCausalLM (float32) with the kjv-sp4k tokenizer, saved as a Hugging Face
    directory."""
    import torch
    import transformers as T

    from jaxllm.config import DataConfig
    from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
    from jaxllm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    path.mkdir(parents=True, exist_ok=True)
    for name, data in hf_tokenizer_files(tokenizer, DataConfig(add_bos=True, add_eos=False)).items():
        (path / name).write_bytes(data)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                           initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_id,
                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    T.LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def task_dir(path: Path) -> Path:
    """tiny_mc (multiple_choice), tiny_ppl (loglikelihood_rolling), tiny_gen (generate_until): task YAMLs with
    local jsonl data (datasets' `json` builder, absolute data_files paths)."""
    path.mkdir(parents=True, exist_ok=True)
    _jsonl(path / "mc.jsonl", [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS])
    _jsonl(path / "ppl.jsonl", [{"text": t} for t in DOCUMENTS])
    _jsonl(path / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in PROMPTS])
    data = lambda name: "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(path / name)  # noqa: E731
    (path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
{data("mc.jsonl")}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (path / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
{data("ppl.jsonl")}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (path / "tiny_gen.yaml").write_text(f"""task: tiny_gen
{data("gen.jsonl")}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["o", "\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return path


