"""`jaxllm data prepare CONFIG [prepare.a.b=value ...]`: the stages of a YAML `prepare:` block in a row, each
stage's output the next one's input, every stage skipped when its output is complete and made from the same
input and settings (so a stopped run goes on where it stopped; a changed setting redoes that stage and those
after it).

    prepare:
      input: data/raw/*.jsonl.gz      # files / glob / comma list, builtin:NAME or hf:NAME (io.py)
      output: data/prepared           # OUTPUT/01-clean, OUTPUT/02-dedup, ... one directory per stage
      engine: local                   # local (all cores here) | beam (runner below)
      runner: DirectRunner            # with engine: beam; DataflowRunner | FlinkRunner | SparkRunner
      pipeline_args: []               # passed to Beam (e.g. --project=..., --region=...)
      stages:
        - clean: {...}                # jaxllm.dataprep.clean.CleanConfig
        - dedup: {...}                # jaxllm.dataprep.minhash.DedupParams, + partitions, clusters
        - decontaminate: {...}        # jaxllm.dataprep.decontaminate.DecontaminateConfig
        - tokenize: {tokenizer: ..., seq_len: ...}   # jaxllm.dataprep.shards.tokenize_to_shards; last

OUTPUT/prepare.json records, per stage, the key it was made with (a hash of its settings and of everything
before it: the input files' names, sizes and times) and its summary.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from jaxllm.config import ConfigError, JaxllmError
from jaxllm.config.loading import apply_override, from_dict, read_yaml
from jaxllm.dataprep import engine, io
from jaxllm.utils import atomic_write_text, ensure_writable_dir

logger = logging.getLogger("jaxllm.dataprep")

STAGES = ("clean", "dedup", "decontaminate", "tokenize")
RECORD = "prepare.json"
_DEDUP_EXTRA = ("partitions", "clusters")  # dedup settings that are not DedupParams


@dataclass
class PrepareConfig:
    input: str = ""
    output: str = ""
    stages: list[Any] = field(default_factory=list)  # [{name: {settings}}], checked by `steps`
    engine: Literal["local", "beam"] = "local"
    runner: str = "DirectRunner"
    pipeline_args: list[str] = field(default_factory=list)
    workers: int = 0  # local engine: processes (0 = all cores)
    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"  # of the documents between stages
    text_field: str = "text"
    id_field: str = "id"
    on_bad_record: Literal["skip", "error"] = "skip"
    samples_per_reason: int = 20
    chunk_bytes: int = io.DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    settings: dict
    dir: Path


def load_prepare_config(path: str | Path, overrides: list[str] = ()) -> PrepareConfig:
    """The `prepare:` block of YAML file `path` with dotted overrides (`prepare.stages.1.dedup.threshold=0.7`)."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    unknown = sorted(set(raw) - {"prepare"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; a data-preparation config holds "
                          "one `prepare:` block (docs/data.md)")
    if "prepare" not in raw:
        raise ConfigError(f"{path} has no `prepare:` block; see configs/data-kjv.yaml")
    cfg = from_dict(PrepareConfig, raw["prepare"], "prepare")
    for step in steps(cfg):
        check_settings(step)
    return cfg


def steps(cfg: PrepareConfig) -> list[Step]:
    """The stages of `cfg`, checked: each a one-key mapping naming a stage; tokenize only last."""
    for name, value in (("input", cfg.input), ("output", cfg.output)):
        if not value:
            raise ConfigError(f"prepare.{name} is not set; give the {'corpus files' if name == 'input' else 'directory'}")
    if "://" in cfg.output:
        raise ConfigError(f"prepare.output {cfg.output} is not a local path: prepare keeps its stages in a directory of "
                          "this machine (or one every Beam worker mounts); on gs:// run the stages one by one, e.g. "
                          "jaxllm data clean --runner DataflowRunner --output gs://... (docs/data.md)")
    if not cfg.stages:
        raise ConfigError(f"prepare.stages is empty; list some of {', '.join(STAGES)}, e.g. [{{clean: {{}}}}]")
    if cfg.workers < 0:
        raise ConfigError(f"prepare.workers must be 0 (all cores) or more, got {cfg.workers}")
    out = []
    for i, item in enumerate(cfg.stages):
        where = f"prepare.stages.{i}"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where} must be one stage, like `- clean: {{...}}`, got {item!r}")
        (name, settings), = item.items()
        if name not in STAGES:
            raise ConfigError(f"{where}: unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}.{name} must be a mapping of settings, got {settings!r}")
        if name == "tokenize" and i != len(cfg.stages) - 1:
            raise ConfigError(f"{where}: tokenize writes ArrayRecord rows, which no stage reads: put it last")
        out.append(Step(i + 1, name, settings, Path(cfg.output) / f"{i + 1:02d}-{name}"))
    return out


def check_settings(step: Step) -> None:
    """Reads a stage's settings as its module does (unknown keys, wrong types: ConfigError), before any work."""
    where = f"prepare.stages.{step.number - 1}.{step.name}"
    if step.name == "clean":
        from jaxllm.dataprep.clean import CleanConfig

        from_dict(CleanConfig, step.settings, where)
    elif step.name == "decontaminate":
        from jaxllm.dataprep.decontaminate import DecontaminateConfig

        from_dict(DecontaminateConfig, step.settings, where)
    elif step.name == "dedup":
        _dedup_params(step)
    else:
        _tokenize_settings(step)


def _key(previous: str, step: Step, cfg: PrepareConfig) -> str:
    common = {k: v for k, v in asdict(cfg).items() if k in ("format", "text_field", "id_field", "on_bad_record",
                                                            "samples_per_reason", "chunk_bytes")}
    files = []  # files the settings name (evaluation sets): an edited one redoes the stage
    for path in step.settings.get("files", []) if step.name == "decontaminate" else []:
        try:
            st = os.stat(path)
            files.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([path, None, None])  # the stage itself reports a missing file
    data = json.dumps([previous, step.name, step.settings, common, files], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _input_key(inputs: str, chunk_bytes: int) -> str:
    shards = io.plan_shards(inputs, chunk_bytes=chunk_bytes)
    return engine.plan_hash(engine.make_plan("input", None, inputs, shards, {}))


def run_prepare(cfg: PrepareConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Runs (or skips) every stage of `cfg`; returns one summary row per stage."""
    plan = steps(cfg)
    out = ensure_writable_dir(cfg.output, "prepare.output")
    record_path = out / RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    key = _input_key(cfg.input, cfg.chunk_bytes)
    inputs, rows = cfg.input, []
    for step in plan:
        key = _key(key, step, cfg)
        done = record.get(step.dir.name)
        marker = step.dir / ("metadata.json" if step.name == "tokenize" else engine.STATS)
        if done is not None and done["key"] == key and marker.is_file():
            log(f"[{step.number}/{len(plan)}] {step.name}: complete in {step.dir}, skipped")
            row = {**done["summary"], "status": "skipped"}
        else:
            log(f"[{step.number}/{len(plan)}] {step.name}: {inputs} -> {step.dir}")
            row = {**_run(step, inputs, cfg, progress), "status": "ran"}
            record[step.dir.name] = {"key": key, "summary": {k: v for k, v in row.items() if k != "status"}}
            atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
        rows.append(row)
        inputs = str(step.dir / f"part-*.{cfg.format}")
    return rows


def _run(step: Step, inputs: str, cfg: PrepareConfig, progress: bool) -> dict:
    common = dict(fmt_out=cfg.format, text_field=cfg.text_field, id_field=cfg.id_field,
                  on_bad_record=cfg.on_bad_record, samples_per_reason=cfg.samples_per_reason)
    start = time.perf_counter()
    if step.name == "tokenize":
        meta = _tokenize(step, inputs, cfg, progress)
        return _row(step, meta["sources"]["documents"], meta["rows"], time.perf_counter() - start, None,
                    f"{meta['rows']} rows x {meta['seq_len']}, {meta['tokens']} tokens")
    if step.name == "dedup":
        stats = _dedup(step, inputs, cfg, common)
    else:
        stage = _doc_stage(step, cfg.text_field)
        if cfg.engine == "beam":
            from jaxllm.dataprep.beam import run_beam

            stats = run_beam(stage, inputs, str(step.dir), runner=cfg.runner, pipeline_args=cfg.pipeline_args,
                             chunk_bytes=cfg.chunk_bytes, **common)
        else:
            stats = engine.run_local(stage, inputs, str(step.dir), workers=cfg.workers, chunk_bytes=cfg.chunk_bytes,
                                     progress=progress, **common)
    top = sorted(stats["dropped"].items(), key=lambda kv: -kv[1])[:3]
    note = ", ".join(f"{reason} {n}" for reason, n in top)
    return _row(step, stats["documents_in"], stats["documents_out"], time.perf_counter() - start,
                stats.get("documents_per_s_per_core"), note)


def _row(step: Step, docs_in: int, docs_out: int, seconds: float, per_core: Any, note: str) -> dict:
    return {"stage": step.name, "dir": str(step.dir), "in": docs_in, "out": docs_out, "seconds": round(seconds, 2),
            "docs_per_s": round(docs_in / seconds, 1) if seconds > 0 else None, "docs_per_s_per_core": per_core,
            "note": note}


def _doc_stage(step: Step, text_field: str) -> engine.DocStage:
    if step.name == "clean":
        from jaxllm.dataprep.clean import Cleaner

        return Cleaner(step.settings, text_field=text_field)
    from jaxllm.dataprep.decontaminate import Decontaminator

    return Decontaminator(step.settings, text_field=text_field)


def _dedup_params(step: Step) -> tuple[Any, dict]:
    from jaxllm.dataprep.minhash import DedupParams

    settings = dict(step.settings)
    extra = {k: settings.pop(k) for k in _DEDUP_EXTRA if k in settings}
    where = f"prepare.stages.{step.number - 1}.dedup"
    try:
        return from_dict(DedupParams, settings, where), extra
    except ConfigError:
        raise
    except JaxllmError as e:  # DedupParams' own checks
        raise ConfigError(f"{where}: {e}") from None


def _dedup(step: Step, inputs: str, cfg: PrepareConfig, common: dict) -> dict:
    params, extra = _dedup_params(step)
    if cfg.engine == "beam":
        from jaxllm.dataprep.dedup_beam import dedup_beam

        if extra.get("clusters"):
            logger.warning("dedup.clusters: clusters.jsonl.gz is written by the local engine only; not written")
        return dedup_beam(inputs, str(step.dir), params, runner=cfg.runner, pipeline_args=cfg.pipeline_args, **common)
    from jaxllm.dataprep.dedup import dedup

    return dedup(inputs, str(step.dir), params, workers=cfg.workers, partitions=extra.get("partitions", 16),
                 write_clusters=bool(extra.get("clusters", False)), chunk_bytes=cfg.chunk_bytes, **common)


def _tokenize_settings(step: Step) -> None:
    from jaxllm.dataprep.shards import tokenize_to_shards

    where = f"prepare.stages.{step.number - 1}.tokenize"
    accepted = [p for p in inspect.signature(tokenize_to_shards).parameters if p not in (
        "inputs", "output", "workers", "text_field", "on_bad_record", "overwrite", "progress", "input_format")]
    unknown = sorted(set(step.settings) - set(accepted))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; settings are {', '.join(accepted)}")
    for needed in ("tokenizer", "seq_len"):
        if needed not in step.settings:
            raise ConfigError(f"{where}.{needed} is not set (e.g. tokenizer: builtin:kjv-sp4k, seq_len: 128)")


def _tokenize(step: Step, inputs: str, cfg: PrepareConfig, progress: bool) -> dict:
    from tqdm import tqdm

    from jaxllm.dataprep.shards import tokenize_to_shards

    _tokenize_settings(step)
    with tqdm(desc="tokenize", unit="doc", disable=not progress) as bar:
        return tokenize_to_shards(inputs, str(step.dir), workers=cfg.workers, text_field=cfg.text_field,
                                  on_bad_record=cfg.on_bad_record, overwrite=True, progress=bar.update,
                                  **step.settings)


def summary_table(rows: list[dict]) -> str:
    """The stages as a text table: documents in and out, time, rates, the main drop reasons."""
    head = ("stage", "in", "out", "seconds", "docs/s", "docs/s/core", "status", "notes")
    lines = [head]
    for r in rows:
        lines.append((r["stage"], str(r["in"]), str(r["out"]), f"{r['seconds']:.1f}", _num(r["docs_per_s"]),
                      _num(r["docs_per_s_per_core"]), r["status"], r["note"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def prepare_command(args) -> int:
    """`jaxllm data prepare` (cli.py)."""
    cfg = load_prepare_config(args.config, args.overrides)
    if cfg.engine == "local" and cfg.pipeline_args:
        raise JaxllmError("prepare.pipeline_args are for engine: beam; drop them or set prepare.engine=beam")
    rows = run_prepare(cfg)
    print(summary_table(rows))
    final = steps(cfg)[-1]
    if final.name == "tokenize":
        seq_len = final.settings["seq_len"]
        print(f"train on the shards with data.sources=[{{path: {final.dir}}}] data.seq_len={seq_len}")
    else:
        print(f"prepared documents: {final.dir}/part-*.{cfg.format}")
    return 0
