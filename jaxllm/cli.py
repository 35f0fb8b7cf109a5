"""The `jaxllm` command: train | generate | distill-data | judge | eval | perplexity | score | convert | bench | plan | data.

Errors a user can fix are printed as one line (`error: ...`) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Sequence

from jaxllm.config import GenerateConfig, JaxllmError
from jaxllm.platforms import keep_off_tpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may stand anywhere on the line: argparse takes those before the first option.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    keep_off_tpu()  # before any command imports JAX's backends
    logging.basicConfig(level=logging.INFO, format="jaxllm: %(message)s")
    # basicConfig does nothing when an imported library configured logging first; jaxllm's own messages
    # (resumed from ..., stopped at ...) must show regardless.
    logging.getLogger("jaxllm").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except JaxllmError as e:
        sys.stderr.write(f"error: {e}\n")  # one write, so other threads' output does not split it
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description="Train, adapt and serve LLMs with JAX.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config (resumes when run_dir has checkpoints)")
    t.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 run_dir=runs/x")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a trained run or checkpoint")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a run directory (its newest checkpoint is used)")
    src.add_argument("--checkpoint", help="a checkpoint directory: run_dir/checkpoints/STEP")
    g.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--chat", action="store_true", help="each prompt is a user message, rendered with the model's "
                   "chat template (the one it was fine-tuned with); the reply ends at EOS or an end-of-turn token")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    kd = sub.add_parser("distill-data", help="a teacher's completions of prompts as prompt/completion jsonl "
                                             "(sequence-level knowledge distillation; docs/post-training.md)")
    kd.add_argument("--teacher", required=True, help="a jaxllm run directory or checkpoint")
    kd.add_argument("--prompts", required=True, help="a data source: jsonl/parquet/text file, builtin:kjv, hf:NAME")
    kd.add_argument("--field", default="text", help="field of the records holding the prompt")
    kd.add_argument("--prompt-tokens", type=int, default=0,
                    help="cut each record to its first N tokens, the teacher writes the rest; 0 = the whole record")
    kd.add_argument("--limit", type=int, default=1000, help="prompts to complete")
    kd.add_argument("--batch-size", type=int, default=32, help="prompts generated at once")
    kd.add_argument("--out", required=True, help="the jsonl file to write")
    _sampling_args(kd)
    kd.set_defaults(func=cmd_distill_data)

    jd = sub.add_parser("judge", help="AI feedback: a judge model labels preference pairs, reports a win-rate of two "
                                      "models, or critiques and revises responses (docs/post-training.md)")
    jd.add_argument("--judge", required=True, help="the judge: a jaxllm run directory or checkpoint, or a Hugging "
                    "Face model directory")
    jd.add_argument("--data", help="jsonl of prompt + response_a + response_b (or a two-item list completions) to "
                    "label, or of prompt + chosen + rejected to also measure the judge's agreement with them; with "
                    "--revise, prompt + response")
    jd.add_argument("--out", help="the preference jsonl to write (prompt, chosen, rejected, confidence, ...)")
    jd.add_argument("--prompts", help="a win-rate: prompts (a text file, one a line, or jsonl with prompt) that "
                    "--model-a and --model-b answer")
    jd.add_argument("--model-a", help="a run, checkpoint or Hugging Face directory")
    jd.add_argument("--model-b", help="a run, checkpoint or Hugging Face directory")
    jd.add_argument("--report", help="with --prompts: write the win-rate report here as JSON")
    jd.add_argument("--template", help="the judge's prompt: a text file with {prompt}, {response_a}, {response_b} "
                    "(default: the built-in one, docs/post-training.md)")
    jd.add_argument("--labels", default="A,B", help="the judge's answers for response A and B (single tokens)")
    jd.add_argument("--min-confidence", type=float, default=0.5,
                    help="drop pairs the judge prefers with a lower order-averaged probability (0.5 to 1)")
    jd.add_argument("--batch-size", type=int, default=8, help="comparisons (2 rows each) or prompts per batch")
    jd.add_argument("--revise", action="store_true", help="critique-and-revise: rewrite each response by "
                    "--principle; the revision becomes chosen, the original rejected")
    jd.add_argument("--principle", help="with --revise: the rule the critique and the rewrite follow")
    jd.add_argument("--reviser", help="with --revise: the model that rewrites (default: the judge)")
    _sampling_args(jd)
    jd.set_defaults(func=cmd_judge)

    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks on a run, checkpoint or Hugging Face directory "
                                     "(docs/evaluation.md)")
    ev.add_argument("model", help="a jaxllm run directory or checkpoint, or a Hugging Face model directory")
    ev.add_argument("--tasks", required=True, help="comma-separated harness tasks or groups, e.g. hellaswag,arc_easy")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    ev.add_argument("--limit", type=float, help="examples per task (below 1: a fraction); for quick checks")
    ev.add_argument("--batch-size", type=int, default=32, help="rows per forward pass over all devices")
    ev.add_argument("--max-gen-toks", type=int, default=256, help="new tokens of a generation task that sets none")
    ev.add_argument("--output-path", help="write the harness's results JSON (and samples) under this directory")
    ev.add_argument("--log-samples", action="store_true", help="also write every sample's prompt, answers and metrics")
    ev.add_argument("--include-path", help="a directory of your own task YAML files (local data: docs/evaluation.md)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the few-shot sampling and of sampled generation")
    ev.add_argument("--bench-hf", action="store_true", help="instead: time these tasks on this model with jaxllm and "
                    "with the harness's Hugging Face backend (a Hugging Face directory), requests/s side by side")
    ev.set_defaults(func=cmd_eval)

    sc = sub.add_parser("score", help="a reward model's scores of prompt/response rows or prompt/chosen/rejected "
                                      "pairs (jsonl), written beside every field; on pairs, the accuracy")
    sc.add_argument("--model", required=True, help="a reward model: jaxllm run or checkpoint (model.head=reward), or "
                    "a Hugging Face *ForSequenceClassification directory")
    sc.add_argument("--data", required=True, help="jsonl rows: prompt + completion, messages, or prompt + chosen + "
                    "rejected")
    sc.add_argument("--out", required=True, help="the jsonl file to write")
    sc.add_argument("--batch-size", type=int, default=16, help="sequences scored at once")
    sc.set_defaults(func=cmd_score)

    c = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face (safetensors)")
    csub = c.add_subparsers(required=True, metavar="DIRECTION")
    h2j = csub.add_parser("hf-to-jaxllm", help="a Hugging Face model directory -> a jaxllm run directory")
    h2j.add_argument("src", help="directory with config.json and model.safetensors (or a sharded index)")
    h2j.add_argument("out", help="run directory to create (usable by generate --run-dir and train.init_from)")
    h2j.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: the checkpoint's)")
    h2j.add_argument("--adapter", help="a PEFT LoRA adapter directory to load onto the model (model.lora)")
    h2j.set_defaults(func=cmd_convert_hf_to_jaxllm)
    j2h = csub.add_parser("jaxllm-to-hf", help="a jaxllm run directory or checkpoint -> a Hugging Face directory "
                                               "(LoRA runs merged, or their adapters in PEFT's format)")
    j2h.add_argument("checkpoint", help="run directory or run_dir/checkpoints/STEP")
    j2h.add_argument("out", help="output directory (config.json, safetensors, tokenizer files)")
    j2h.add_argument("--dtype", choices=["float32", "bfloat16"], help="tensor dtype (default: the parameters')")
    j2h.add_argument("--max-shard-gb", type=float, default=5.0, help="split safetensors files above this size")
    j2h.add_argument("--adapters-only", action="store_true",
                     help="a LoRA run: write its adapters alone in PEFT's format (default: merge them into the base)")
    j2h.set_defaults(func=cmd_convert_jaxllm_to_hf)

    b = sub.add_parser("bench", help="measure tokens/s, MFU and memory, side by side with transformers")
    b.add_argument("config", help="YAML config, e.g. configs/bench-1b.yaml")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=8")
    b.add_argument("--steps", type=int, default=10, help="measured steps (after warm-up)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--peer", choices=["none", "eager", "compile", "both", "trl"], default="both",
                   help="transformers on torch: eager, torch.compile, or both; trl: post-training steps (SFT, and "
                        "distillation when the config's objective has a teacher) against TRL's trainers, next to "
                        "a pretraining step of the same model")
    b.add_argument("--trl-packing", choices=["bfd", "padded", "both"], default="bfd",
                   help="with --peer trl: TRL SFT batches packed padding-free (bfd, TRL's recommendation) or "
                        "padded per example")
    b.add_argument("--segments", type=int, default=4,
                   help="with --peer trl: prompt + completion examples packed in each row of the SFT batch")
    b.add_argument("--data", action="store_true", help="also measure the data pipeline alone")
    b.add_argument("--generate", action="store_true", help="also measure prefill and decode tokens/s")
    b.add_argument("--out", help="write the results as JSON here")
    b.add_argument("--breakdown", action="store_true",
                   help="also time the step's parts alone: forward, backward, loss head, optimizer update")
    b.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 train steps to DIR")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="compile the train step for a TPU topology here: memory per chip, FLOPs, "
                                     "step time, MFU (needs pip install -e '.[plan]')")
    pl.add_argument("config", help="YAML config, e.g. configs/llama3-8b.yaml")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64")
    pl.add_argument("--topology", required=True, help="a TPU slice: v5p-128, v5e-16, v6e-64, v4-32 or v5p:4x4x4")
    pl.add_argument("--slices", type=int, default=1, help="identical slices joined over DCN (multi-slice)")
    pl.add_argument("--search", action="store_true",
                    help="rank mesh factorisations x remat policies x micro-batches; compile the best")
    pl.add_argument("--top", type=int, default=3, help="with --search: stop after this many compiled plans fit")
    pl.add_argument("--max-compiles", type=int, default=6, help="with --search: compile at most this many")
    pl.add_argument("--rows", type=int, default=10, help="layouts shown")
    pl.set_defaults(func=cmd_plan)

    pp = sub.add_parser("perplexity", help="token, word and byte perplexity of text sources with sliding windows "
                                           "(docs/evaluation.md)")
    pp.add_argument("model", help="a jaxllm run directory or checkpoint, or a Hugging Face model directory")
    pp.add_argument("--data", action="append", required=True,
                    help="a source: file, glob, builtin:kjv-valid, hf:NAME ...; repeat for several")
    pp.add_argument("--text-field", default="text", help="field of jsonl/parquet/hf records holding the text")
    pp.add_argument("--text-unit", choices=["file", "paragraph", "line"], default="file",
                    help="what one document of a plain text file is (default: the whole file)")
    pp.add_argument("--max-length", type=int, help="tokens per window (default: the model's context)")
    pp.add_argument("--stride", type=int, help="new tokens scored per window (default: --max-length, no overlap)")
    pp.add_argument("--batch-size", type=int, default=8, help="windows scored at once")
    pp.add_argument("--limit", type=int, help="documents per source (default: all)")
    pp.add_argument("--output", help="also write the results as JSON here")
    pp.add_argument("--tokenizer", help="use this tokenizer instead of the model's own")
    pp.set_defaults(func=cmd_perplexity)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(required=True, metavar="TOOL")
    tt = dsub.add_parser("train-tokenizer", help="train a tokenizer (SentencePiece BPE/unigram, byte-level BPE, "
                                                 "WordPiece) on (a sample of) text sources")
    tt.add_argument("--input", action="append", required=True,
                    help="a source: file, glob, builtin:kjv, hf:NAME ...; repeat for several")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--model-type", choices=["bpe", "unigram", "byte-bpe", "wordpiece"], default="bpe",
                    help="bpe/unigram: SentencePiece (PREFIX.model); byte-bpe (GPT-2 / LLaMA-3 style) and wordpiece "
                         "(BERT style): a Hugging Face tokenizer directory")
    tt.add_argument("--output", required=True, help="SentencePiece: output prefix, writes PREFIX.model; byte-bpe and "
                                                    "wordpiece: a directory for tokenizer.json and its configs")
    tt.add_argument("--text-field", default="text", help="field of jsonl/parquet/hf records holding the text")
    tt.add_argument("--sample-docs", type=int, help="train on a uniform random sample of this many documents")
    tt.add_argument("--sample-bytes", type=int, help="train on a uniform random sample of at most this many bytes")
    tt.add_argument("--min-frequency", type=int, default=2, help="byte-bpe, wordpiece: least count of a merge")
    tt.add_argument("--lowercase", action="store_true", help="wordpiece: lowercase the text (BERT uncased)")
    tt.add_argument("--seed", type=int, default=0, help="the sample's and SentencePiece's seed")
    tt.set_defaults(func=cmd_train_tokenizer)
    tk = dsub.add_parser("tokenize", help="tokenise and pack documents into ArrayRecord shards of training rows "
                                          "(data.sources: [{path: DIR}] trains from them)")
    tk.add_argument("--input", required=True, help="documents: a file, glob or comma-separated list (jsonl[.gz], "
                                                   "parquet, text), builtin:NAME or hf:NAME")
    tk.add_argument("--output", required=True, help="directory for the shards, metadata.json and the tokenizer")
    tk.add_argument("--tokenizer", required=True, help="a SentencePiece .model, a Hugging Face tokenizer directory or "
                                                       "builtin:kjv-sp4k")
    tk.add_argument("--seq-len", type=int, required=True, help="tokens per row (= data.seq_len of the training run)")
    tk.add_argument("--objective", choices=["clm"], default="clm", help="the packing (clm: the trainer's)")
    tk.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True, help="BOS before each document")
    tk.add_argument("--add-eos", action=argparse.BooleanOptionalAction, default=True, help="EOS after each document")
    tk.add_argument("--rows-per-shard", type=int, default=8192)
    tk.add_argument("--workers", type=int, default=0, help="tokenising processes (default 0: one per core)")
    tk.add_argument("--text-field", default="text", help="field of jsonl/parquet/hf records holding the text")
    tk.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "hf"],
                    help="input format (auto: from the extension)")
    tk.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    tk.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    tk.set_defaults(func=cmd_data_tokenize)
    pv = dsub.add_parser("preview", help="show the first training rows of a config as the train step sees them: "
                                         "each packed example's text with the trained tokens marked")
    pv.add_argument("config", help="YAML config, e.g. configs/tiny-sft.yaml")
    pv.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=256")
    pv.add_argument("-n", type=int, default=4, help="rows to show (default 4)")
    pv.add_argument("--json", action="store_true", help="one JSON object per row: input_ids, labels (-100 where "
                    "not trained), loss_mask, segment_ids, positions")
    pv.set_defaults(func=cmd_data_preview)
    rl = dsub.add_parser("ref-logps", help="score a DPO config's preference data with its reference model once and "
                                           "write it back with ref_chosen_logps / ref_rejected_logps")
    rl.add_argument("config", help="YAML config with data.objective.name=dpo, e.g. configs/tiny-dpo.yaml")
    rl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.sources=[{path: pairs.jsonl}]")
    rl.add_argument("--out", required=True, help="output jsonl: each record with the reference's log-probs")
    rl.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    rl.set_defaults(func=cmd_data_ref_logps)
    cl = dsub.add_parser("clean", help="normalise, filter (Gopher, C4, FineWeb rules), identify the language and "
                                       "scrub PII of a corpus; stats.json and rejected/ samples per drop reason")
    cl.add_argument("--config", help="YAML mapping of the clean settings (docs/data.md \"Cleaning\")")
    cl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. gopher_quality.min_doc_words=20 "
                                                 "language.languages=[en,fr] pii.enabled=false")
    _doc_stage_args(cl)
    cl.set_defaults(func=cmd_data_clean)
    dc = dsub.add_parser("decontaminate", help="drop or flag documents sharing a 13-gram with evaluation sets "
                                               "(files or lm-evaluation-harness tasks)")
    dc.add_argument("--eval-file", action="append", default=[], help="evaluation set: jsonl(.gz) or text; repeatable")
    dc.add_argument("--eval-text-field", default="text", help="field of the evaluation jsonl holding the text")
    dc.add_argument("--tasks", default="", help="comma-separated lm-evaluation-harness tasks, e.g. arc_easy,hellaswag")
    dc.add_argument("--include-path", help="a directory of your own task YAML files")
    dc.add_argument("--n", type=int, default=13, help="words per n-gram (default 13, GPT-3's)")
    dc.add_argument("--mode", choices=["drop", "flag"], default="drop",
                    help="drop contaminated documents, or keep them with contaminated/contamination_* fields")
    _doc_stage_args(dc)
    dc.set_defaults(func=cmd_data_decontaminate)
    dd = dsub.add_parser("dedup", help="remove exact and near-duplicate documents (MinHash LSH), keeping one "
                                       "survivor per cluster: the longest, ties by input order (docs/data.md)")
    dd.add_argument("--input", required=True, help="jsonl(.gz)/parquet/text files: a file, glob or comma-separated "
                                                   "list, builtin:NAME or hf:NAME")
    dd.add_argument("--output", required=True, help="directory: part-NNNNN shards, stats.json, rejected/")
    dd.add_argument("--mode", choices=["minhash", "exact"], default="minhash",
                    help="exact: same normalised text only; minhash: also near-duplicates (default)")
    dd.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of duplicates (default 0.8)")
    dd.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5)")
    dd.add_argument("--num-perm", type=int, default=112, help="MinHash permutations (default 112)")
    dd.add_argument("--bands", type=int, default=0, help="LSH bands (with --rows; default: derived from --threshold)")
    dd.add_argument("--rows", type=int, default=0, help="rows per band (with --bands)")
    dd.add_argument("--no-verify", action="store_true", help="keep candidate pairs whose estimated Jaccard is below "
                                                             "the threshold")
    dd.add_argument("--seed", type=int, default=1, help="MinHash seed")
    dd.add_argument("--unicode", choices=["NFC", "NFKC", "NFD", "NFKD", "none"], default="NFC")
    dd.add_argument("--case-sensitive", action="store_true", help="do not lowercase before comparing")
    dd.add_argument("--keep-whitespace", action="store_true", help="do not collapse runs of whitespace")
    dd.add_argument("--strip-punctuation", action="store_true", help="compare without punctuation")
    dd.add_argument("--clusters", action="store_true", help="also write clusters.jsonl.gz (id, cluster, kept)")
    dd.add_argument("--partitions", type=int, default=16, help="band-key partitions grouped one at a time "
                                                                "(memory); default 16")
    dd.add_argument("--runner", default="local", help="local (all cores, default), or a Beam runner: DirectRunner, "
                                                      "DataflowRunner, FlinkRunner, SparkRunner")
    dd.add_argument("--workers", type=int, default=0, help="processes of the local runner (0 = all cores)")
    dd.add_argument("--format", choices=["jsonl.gz", "parquet"], default="jsonl.gz")
    dd.add_argument("--text-field", default="text")
    dd.add_argument("--id-field", default="id")
    dd.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    dd.add_argument("--samples-per-reason", type=int, default=20, help="removed documents kept in rejected/")
    dd.add_argument("--pipeline-arg", action="append", default=[], help="a Beam pipeline option, e.g. "
                                                                       "--pipeline-arg=--project=P; repeatable")
    dd.set_defaults(func=cmd_data_dedup)
    pr = dsub.add_parser("prepare", help="clean -> dedup -> decontaminate -> tokenize from a config's prepare: block, "
                                         "each stage skipped when already complete (docs/data.md)")
    pr.add_argument("config", help="YAML file with a prepare: block, e.g. configs/data-kjv.yaml")
    pr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prepare.engine=beam prepare.workers=2")
    pr.set_defaults(func=cmd_data_prepare)
    return p


def _doc_stage_args(parser: argparse.ArgumentParser) -> None:
    """The options of every per-document `jaxllm data` stage (jaxllm.dataprep.engine.run_local's)."""
    parser.add_argument("--input", required=True, help="input files: a glob, comma list or hf:NAME (jsonl(.gz), "
                                                       "parquet, text)")
    parser.add_argument("--output", required=True, help="output directory: part-NNNNN shards, stats.json, rejected/")
    parser.add_argument("--runner", default="local", help="local (all cores, default), or a Beam runner: DirectRunner, "
                                                          "DataflowRunner, FlinkRunner, SparkRunner")
    parser.add_argument("--pipeline-arg", action="append", default=[], help="a Beam pipeline option, e.g. "
                                                                           "--pipeline-arg=--project=P; repeatable")
    parser.add_argument("--workers", type=int, default=0, help="processes of the local runner (default 0: all cores)")
    parser.add_argument("--format", choices=["jsonl.gz", "parquet"], default="jsonl.gz", help="output shards")
    parser.add_argument("--text-field", default="text", help="field holding the text")
    parser.add_argument("--id-field", default="id", help="field holding the document id (else file:line)")
    parser.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    parser.add_argument("--samples-per-reason", type=int, default=20, help="dropped documents kept per reason")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    defaults = GenerateConfig()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams, help="> 1: beam search (with --temperature 0)")
    parser.add_argument("--length-penalty", type=float, default=defaults.length_penalty,
                        help="beam search: score = sum of log-probs / new_tokens ** this")
    parser.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                        help="beam search: stop when num_beams hypotheses are done (true), when none can improve "
                             "(false), or as canonical beam search (never); as transformers")
    parser.add_argument("--num-return-sequences", type=int, default=defaults.num_return_sequences,
                        help="outputs per prompt: the n best beams, or n samples")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 = off")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size, help="0 = off")
    parser.add_argument("--min-new-tokens", type=int, default=defaults.min_new_tokens,
                        help="no EOS before this many new tokens")
    parser.add_argument("--stop", action="append", default=[], help="the text ends before this string; repeatable")
    parser.add_argument("--tokenizer", help="use this tokenizer instead of the checkpoint's (needed when it has none): "
                                            "a tokenizer.json, a directory with one, a SentencePiece .model, "
                                            "builtin:kjv-sp4k")


def _generate_config(args) -> GenerateConfig:
    """The sampling options of `args`, checked as a config's would be."""
    from jaxllm.config import Config, validate

    early = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    gen = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                         length_penalty=args.length_penalty, early_stopping=early,
                         num_return_sequences=args.num_return_sequences, repetition_penalty=args.repetition_penalty,
                         no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                         stop=list(args.stop))
    validate(dataclasses.replace(Config(), generate=gen))
    return gen


def cmd_train(args) -> int:
    from jaxllm.config import load_config

    cfg = load_config(args.config, args.overrides)
    from jaxllm import distributed

    distributed.initialize(cfg.distributed)  # before anything touches a device
    import jax

    from jaxllm.infer.generate import generate_text
    from jaxllm.train.loop import Trainer

    log = logging.getLogger("jaxllm")
    log.info("devices: %d x %s; run_dir: %s", jax.device_count(), jax.devices()[0].platform, cfg.run_dir)
    if cfg.rl.algorithm == "best_of_n":  # rounds of sampling and sft, each its own Trainer run
        from jaxllm.rl.best_of_n import run_best_of_n

        run_best_of_n(cfg, Trainer)
        return 0
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    losses = summary["losses"]
    if losses:
        first, last = min(losses), max(losses)
        log.info("steps %d -> %d; loss %.3f (step %d) -> %.3f (step %d)",
                 summary["start_step"], summary["end_step"], losses[first], first, losses[last], last)
    if "eval_loss" in summary:
        log.info("held-out loss %.3f", summary["eval_loss"])
    if summary["stopped_early"]:
        log.info("stopped at step %d; run the same command again to resume", summary["end_step"])
        return 0
    if cfg.train.sample_prompt and trainer.cfg.model.arch != "encoder":
        # Every process takes part (the parameters are global arrays); process 0 prints.
        # One sample of train.sample_tokens tokens, whatever generate.* asks of a full generation.
        gen = dataclasses.replace(cfg.generate, max_new_tokens=cfg.train.sample_tokens, num_return_sequences=1,
                                  min_new_tokens=min(cfg.generate.min_new_tokens, cfg.train.sample_tokens))
        (text,) = generate_text(trainer.graphdef, trainer.state.params, trainer.cfg, trainer.tokenizer,
                                [cfg.train.sample_prompt], gen)
        if jax.process_index() == 0:
            print(f"\nsample> {cfg.train.sample_prompt}{text}\n")
    return 0


def cmd_generate(args) -> int:
    from jaxllm import distributed
    from jaxllm.config import DistributedConfig

    # Several processes (a model too big for one host) join from the environment: JAXLLM_*, Slurm or TPU.
    distributed.initialize(DistributedConfig())
    import jax

    from jaxllm.infer.generate import generate_text
    from jaxllm.infer.load import load_model

    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise JaxllmError(f"--prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise JaxllmError("give at least one --prompt or a --prompts-file")
    gen = _generate_config(args)
    source = args.run_dir or args.checkpoint
    loaded = load_model(source, tokenizer=args.tokenizer)
    if loaded.tokenizer is None:
        raise JaxllmError(f"{source} carries no tokenizer; pass --tokenizer PATH (a tokenizer.json or a directory "
                          "with one, a SentencePiece .model, or builtin:kjv-sp4k)")
    texts = generate_text(loaded.graphdef, loaded.params, loaded.config, loaded.tokenizer, prompts, gen,
                          chat=args.chat)
    if jax.process_index() != 0:
        return 0
    per_prompt = gen.num_return_sequences
    for i, text in enumerate(texts):
        prompt = prompts[i // per_prompt]
        print(f"{prompt}\n> {text}" if args.chat else f"{prompt}{text}")
        if len(texts) > 1:
            print("---")
    return 0


def cmd_distill_data(args) -> int:
    from jaxllm import distributed
    from jaxllm.config import DistributedConfig, SourceConfig

    distributed.initialize(DistributedConfig())
    import jax

    from jaxllm.infer.completions import write_completions
    from jaxllm.infer.load import load_model

    for name in ("limit", "batch_size"):
        if getattr(args, name) < 1:
            raise JaxllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_tokens < 0:
        raise JaxllmError(f"--prompt-tokens must be >= 0 (0 = the whole record), got {args.prompt_tokens}")
    gen = _generate_config(args)
    teacher = load_model(args.teacher, tokenizer=args.tokenizer)
    source = SourceConfig(path=args.prompts, text_field=args.field)
    count = write_completions(teacher, source, args.out, gen, limit=args.limit, prompt_tokens=args.prompt_tokens,
                              batch_size=args.batch_size)
    if jax.process_index() == 0:
        print(f"wrote {count} completions to {args.out}")
    return 0


def cmd_perplexity(args) -> int:
    from jaxllm.eval.perplexity import run_perplexity

    return run_perplexity(args)


def cmd_judge(args) -> int:
    from jaxllm import distributed
    from jaxllm.config import DistributedConfig

    distributed.initialize(DistributedConfig())
    from jaxllm.infer.feedback import run

    return run(args, _generate_config(args))


def cmd_eval(args) -> int:
    from jaxllm import distributed
    from jaxllm.config import DistributedConfig

    distributed.initialize(DistributedConfig())
    from jaxllm.eval.cli import run_eval_command

    return run_eval_command(args)


def cmd_score(args) -> int:
    from jaxllm.infer.score import score_file

    result = score_file(args.model, args.data, args.out, args.batch_size)
    accuracy = f", accuracy {result['accuracy']:.4f} on {result['pairs']} pairs" if result["pairs"] else ""
    print(f"wrote {result['rows']} scored rows to {args.out}{accuracy}")
    return 0


def cmd_convert_hf_to_jaxllm(args) -> int:
    from jaxllm.convert.hf import hf_to_jaxllm

    out = hf_to_jaxllm(args.src, args.out, param_dtype=args.dtype, adapter=args.adapter)
    print(f"wrote {out}")
    return 0


def cmd_convert_jaxllm_to_hf(args) -> int:
    from jaxllm.convert.hf import jaxllm_to_hf

    out = jaxllm_to_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                       adapters_only=args.adapters_only)
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    import jax

    from jaxllm import bench
    from jaxllm.config import load_config

    cfg = load_config(args.config, args.overrides)
    results: dict = {"config": args.config, "overrides": args.overrides, "platform": jax.devices()[0].platform,
                     "date": __import__("datetime").date.today().isoformat()}
    if args.peer == "trl":
        return _bench_post_training(cfg, args, results)
    # The peer runs first: JAX's allocator keeps GPU memory once it has it; torch returns its own.
    peers = {"none": [], "eager": [False], "compile": [True], "both": [False, True]}[args.peer]
    for compiled in peers:
        from jaxllm.bench_peer import bench_transformers

        name = "transformers+torch.compile" if compiled else "transformers (eager)"
        try:
            results[name] = bench_transformers(cfg, compiled, args.warmup, args.steps)
        except Exception as e:  # a peer that fails (e.g. no compiler for torch.compile) is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if args.generate and args.peer != "none":
        from jaxllm.bench_peer import bench_transformers_generate

        results["generate (transformers)"] = bench_transformers_generate(cfg)
    setup = bench.setup(cfg)  # initialised and compiled once, for throughput, breakdown and profile
    results = {"jaxllm": bench.bench_train(setup, args.warmup, args.steps), **results}
    if args.breakdown:
        results["step breakdown"] = bench.bench_breakdown(setup, min(args.warmup, 2), max(args.steps // 2, 3))
    if args.profile:
        results["profile"] = str(bench.profile_steps(setup, args.profile))
    del setup  # its state leaves the devices before generation builds its own
    if args.data:
        results["data pipeline"] = bench.bench_data(cfg)
    if args.generate:
        results["generate (jaxllm)"] = bench.bench_generate(cfg)
    bench.write_report(results, args.out)
    ours = results["jaxllm"]
    print(f"{cfg.model.family or cfg.model.arch}: {ours['params']['total'] / 1e6:.1f}M params, "
          f"batch {cfg.train.batch_size} x {cfg.data.seq_len}, {ours['devices']} x {ours['device_kind']}, "
          f"model FLOPs/token {ours['flops_per_token']:.3g}, peak {ours['peak_flops_per_device']:.3g} FLOP/s "
          f"({ours['peak_source']}), compile {ours['compile_s']:.1f} s")
    print(bench.format_table(results))
    for name, r in results.items():
        if isinstance(r, dict) and "error" in r:
            print(f"{name}: {r['error']}")
        if isinstance(r, dict) and ("prefill_tokens_per_sec" in r or name == "data pipeline"):
            print(f"{name}: " + ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if "step breakdown" in results:
        print(bench.format_breakdown(results["step breakdown"]))
    if "profile" in results:
        print(f"profile: {results['profile']} (tensorboard --logdir {results['profile']}, or its .trace.json.gz "
              "in ui.perfetto.dev)")
    return 0


def _bench_post_training(cfg, args, results: dict) -> int:
    """`jaxllm bench --peer trl`: jaxllm's pretraining, SFT (and the config's objective's) steps next to TRL's."""
    from jaxllm import bench
    from jaxllm.bench_trl import bench_post_training
    from jaxllm.train.objective import check_trainable

    if args.breakdown or args.profile or args.data or args.generate:
        raise JaxllmError("--breakdown, --profile, --data and --generate measure the config's own step: run them "
                          "without --peer trl")
    if check_trainable(cfg).online is not None:  # online RL: rollout + update cycles against TRL's (bench_rl.py)
        from jaxllm.bench_rl import bench_online, format_online

        results.update(bench_online(cfg, args.warmup, args.steps))
        bench.write_report(results, args.out)
        print(bench.format_table(results))
        print(format_online(results))
        return 0
    packings = ("bfd", "padded") if args.trl_packing == "both" else (args.trl_packing,)
    results.update(bench_post_training(cfg, args.warmup, args.steps, packings, args.segments))
    bench.write_report(results, args.out)
    ours = results["jaxllm pretraining (clm)"]
    print(f"{cfg.model.family or cfg.model.arch}: {ours['params']['total'] / 1e6:.1f}M params, batch "
          f"{cfg.train.batch_size} x {cfg.data.seq_len} ({args.segments} examples per SFT row), {ours['devices']} x "
          f"{ours['device_kind']}, peak {ours['peak_flops_per_device']:.3g} FLOP/s ({ours['peak_source']})")
    print(bench.format_table(results))
    for name, r in results.items():
        if isinstance(r, dict) and r.get("note"):
            print(f"{name}: {r['note']}")
    return 0


def cmd_plan(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.plan import format_plan, parse_topology, plan

    cfg = load_config(args.config, args.overrides)
    topology = parse_topology(args.topology, args.slices)
    if args.top < 1 or args.max_compiles < 1:
        raise JaxllmError("--top and --max-compiles must be >= 1")
    result = plan(cfg, topology, search=args.search, top=args.top, max_compiles=args.max_compiles,
                  progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_plan(result, rows=args.rows))
    return 0


def cmd_data_preview(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.train.preview import first_rows, row_json, row_text, run_tokenizer

    if args.n < 1:
        raise JaxllmError(f"-n must be at least 1, got {args.n}")
    cfg = load_config(args.config, args.overrides)
    from jaxllm.data.preference import OBJECTIVES as PREFERENCE

    tokenizer = run_tokenizer(cfg)
    shifted = cfg.data.objective.name not in PREFERENCE
    for index, row in enumerate(first_rows(cfg, tokenizer, args.n)):
        print(row_json(row) if args.json else row_text(row, tokenizer, index, shifted), flush=True)
    return 0


def cmd_data_ref_logps(args) -> int:
    from tqdm import tqdm

    from jaxllm.config import load_config
    from jaxllm.train.ref_logps import precompute

    if args.batch_size < 1:
        raise JaxllmError(f"--batch-size must be at least 1, got {args.batch_size}")
    cfg = load_config(args.config, args.overrides)
    with tqdm(desc="reference log-probs", unit="pair") as bar:
        counts = precompute(cfg, args.out, args.batch_size, progress=bar.update)
    print(f"wrote {counts['written']} records to {args.out} ({counts['skipped']} skipped); train on it with "
          f"data.sources=[{{path: {args.out}}}] data.objective.precomputed_reference=true")
    return 0


def cmd_data_prepare(args) -> int:
    from jaxllm.dataprep.prepare import prepare_command

    return prepare_command(args)


def _run_doc_stage(stage, args) -> int:
    options = dict(fmt_out=args.format, text_field=args.text_field, id_field=args.id_field,
                   on_bad_record=args.on_bad_record, samples_per_reason=args.samples_per_reason)
    if args.runner == "local":
        if args.pipeline_arg:
            raise JaxllmError("--pipeline-arg is for Beam runners; add --runner DirectRunner (or DataflowRunner, ...)")
        from jaxllm.dataprep.engine import run_local

        stats = run_local(stage, args.input, args.output, workers=args.workers, **options)
    else:
        from jaxllm.dataprep.beam import run_beam

        stats = run_beam(stage, args.input, args.output, runner=args.runner, pipeline_args=args.pipeline_arg,
                         **options)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items(), key=lambda kv: -kv[1])[:8])
    print(f"{stage.name}: {stats['documents_in']} documents in, {stats['documents_out']} out"
          f"{' (dropped: ' + dropped + ')' if dropped else ''}; stats in {args.output}/stats.json")
    return 0


def cmd_data_clean(args) -> int:
    from jaxllm.config.loading import apply_override, read_yaml
    from jaxllm.dataprep.clean import Cleaner

    raw = read_yaml(args.config) if args.config else {}
    for item in args.overrides:
        apply_override(raw, item)
    return _run_doc_stage(Cleaner(raw, text_field=args.text_field), args)


def cmd_data_decontaminate(args) -> int:
    from jaxllm.dataprep.decontaminate import DecontaminateConfig, Decontaminator

    config = DecontaminateConfig(files=args.eval_file, text_field=args.eval_text_field, n=args.n, mode=args.mode,
                                 tasks=[t for t in args.tasks.split(",") if t], include_path=args.include_path)
    return _run_doc_stage(Decontaminator(config, text_field=args.text_field), args)


def cmd_data_dedup(args) -> int:
    from jaxllm.dataprep.dedup import dedup_command

    return dedup_command(args)


def cmd_data_tokenize(args) -> int:
    from tqdm import tqdm

    from jaxllm.dataprep.shards import tokenize_to_shards

    with tqdm(desc="tokenize", unit="doc", disable=None) as bar:
        meta = tokenize_to_shards(
            args.input, args.output, args.tokenizer, args.seq_len, add_bos=args.add_bos, add_eos=args.add_eos,
            objective=args.objective, rows_per_shard=args.rows_per_shard, workers=args.workers,
            text_field=args.text_field, input_format=args.format, on_bad_record=args.on_bad_record,
            overwrite=args.overwrite, progress=bar.update,
        )  # fmt: skip
    print(f"wrote {meta['rows']} rows of {meta['seq_len']} ({meta['tokens']} tokens) from "
          f"{meta['sources']['documents']} documents in {len(meta['shards'])} shards to {args.output} "
          f"({meta['documents_per_second']:.0f} documents/s); train on them with "
          f"data.sources=[{{path: {args.output}}}] data.seq_len={meta['seq_len']}")
    return 0


def cmd_train_tokenizer(args) -> int:
    from jaxllm.config import SourceConfig
    from jaxllm.dataprep.tokenizer_train import train_tokenizer

    sources = [SourceConfig(path=p, text_field=args.text_field) for p in args.input]
    tokenizer, path = train_tokenizer(sources, args.output, args.model_type, args.vocab_size,
                                      sample_docs=args.sample_docs, sample_bytes=args.sample_bytes,
                                      min_frequency=args.min_frequency, lowercase=args.lowercase, seed=args.seed)
    print(f"wrote {path} ({tokenizer.vocab_size} ids); use it with tokenizer.path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
