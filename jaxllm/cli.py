"""The `jaxllm` command: train | generate | data.

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="jaxllm: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except JaxllmError as e:
        print(f"error: {e}", file=sys.stderr)
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
    defaults = GenerateConfig()
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.set_defaults(func=cmd_generate)

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

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(required=True, metavar="TOOL")
    tt = dsub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on text sources")
    tt.add_argument("--input", action="append", required=True,
                    help="a source: file, glob, builtin:kjv, hf:NAME ...; repeat for several")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tt.add_argument("--output", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    tt.add_argument("--text-field", default="text", help="field of jsonl/parquet/hf records holding the text")
    tt.set_defaults(func=cmd_train_tokenizer)
    return p


def cmd_train(args) -> int:
    from jaxllm.config import load_config

    cfg = load_config(args.config, args.overrides)
    import jax

    from jaxllm.infer.generate import generate_text
    from jaxllm.train.loop import Trainer

    log = logging.getLogger("jaxllm")
    log.info("devices: %d x %s; run_dir: %s", jax.device_count(), jax.devices()[0].platform, cfg.run_dir)
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
        gen = dataclasses.replace(cfg.generate, max_new_tokens=cfg.train.sample_tokens)
        (text,) = generate_text(trainer.graphdef, trainer.state.params, trainer.cfg, trainer.tokenizer,
                                [cfg.train.sample_prompt], gen)
        if jax.process_index() == 0:
            print(f"\nsample> {cfg.train.sample_prompt}{text}\n")
    return 0


def cmd_generate(args) -> int:
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
    gen = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    from jaxllm.config import validate, Config
    validate(dataclasses.replace(Config(), generate=gen))
    loaded = load_model(args.run_dir or args.checkpoint)
    if loaded.tokenizer is None:
        raise JaxllmError(f"{args.run_dir or args.checkpoint} carries no tokenizer; convert it with its tokenizer files")
    texts = generate_text(loaded.graphdef, loaded.params, loaded.config, loaded.tokenizer, prompts, gen)
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}")
        if len(prompts) > 1:
            print("---")
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


def cmd_train_tokenizer(args) -> int:
    from jaxllm.config import SourceConfig
    from jaxllm.data.tokenizer import train_sentencepiece

    sources = [SourceConfig(path=p, text_field=args.text_field) for p in args.input]
    path = train_sentencepiece(sources, args.output, vocab_size=args.vocab_size, model_type=args.model_type)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
