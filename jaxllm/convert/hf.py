"""Hugging Face checkpoints in and out: `from_hf`, `load_hf_params`, `save_hf`, and the two
`jaxllm convert` directions.

Loading goes rule by rule: each HF tensor is read (memory-mapped) once, converted, and cut into the
shards this host's devices hold, so a host holds at most its own shards of one rule's parameters
besides the tensor being read, never the whole model. Saving gathers one layer's tensor at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm import models, sharding
from jaxllm.config import Config, DataConfig, MeshConfig, ModelConfig, dump_yaml
from jaxllm.convert.families import Family
from jaxllm.convert.hf_io import ConversionError, SafetensorsReader, ShardedWriter, read_hf_config
from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
from jaxllm.convert.peft import load_peft_adapters, save_peft_adapters
from jaxllm.convert.registry import family_for, family_of, leaves, nest
from jaxllm.convert.rules import Rule, to_hf, to_ours
from jaxllm.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger("jaxllm")

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja")


def config_from_hf(hf_config: dict[str, Any], param_dtype: str | None = None,
                   reader: SafetensorsReader | None = None) -> ModelConfig:
    """Our ModelConfig for a config.json; `param_dtype` defaults to the checkpoint's own dtype.

    With the checkpoint's `reader`, an output head stored apart from (and unequal to) the embedding
    table unties them, as transformers does.
    """
    family = family_of(hf_config)
    try:
        cfg = family.config_from_hf(hf_config)
    except KeyError as e:
        raise ConversionError(f"config.json of a {family.name} model lacks the field {e.args[0]!r}") from None
    if cfg.tie_embeddings and reader is not None and reader.has("lm_head.weight"):
        untied = dataclasses.replace(cfg, tie_embeddings=False)
        embed = next(r.hf for r in family.rules(untied) if r.ours == ("embed/embedding",))
        if any(r.hf == "lm_head.weight" for r in family.rules(untied)) and not np.array_equal(
            reader.get("lm_head.weight"), reader.get(_resolver(reader, family)(embed))
        ):
            cfg = untied
    if param_dtype is None:
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        param_dtype = stored if stored in ("float32", "bfloat16") else "float32"
    return dataclasses.replace(cfg, family=hf_config["model_type"], param_dtype=param_dtype)


def _plan(rules: list[Rule], abstract_flat: dict[str, Any], family: Family) -> dict[str, tuple[Rule, int]]:
    """Which rule (and which of its parts) fills each of our parameters; all must be covered once."""
    plan: dict[str, tuple[Rule, int]] = {}
    for rule in rules:
        for part, path in enumerate(rule.ours):
            if path not in abstract_flat:
                raise ConversionError(f"{family.name} rule for {rule.hf} names unknown parameter {path}")
            plan[path] = (rule, part)
    missing = sorted(set(abstract_flat) - set(plan))
    if missing:
        raise ConversionError(f"no {family.name} tensor maps to {', '.join(missing)}: this configuration is not convertible")
    return plan


def _check_config(cfg: ModelConfig) -> None:
    if not cfg.scan_layers and not cfg.share_layers:
        raise ConversionError("conversion works on the scanned layer layout; set model.scan_layers=true")


def load_hf_params(directory: str | Path, cfg: ModelConfig, mesh: Mesh, rules_table: sharding.Rules) -> Any:
    """Parameters for `cfg` from the safetensors in `directory`, born sharded on `mesh`."""
    family = family_of(read_hf_config(directory))
    return _load_params(SafetensorsReader(directory), family, cfg, mesh, rules_table)


def _load_params(reader: SafetensorsReader, family: Family, cfg: ModelConfig, mesh: Mesh,
                 rules_table: sharding.Rules) -> Any:
    _check_config(cfg)
    _, abstract, shardings = models.sharded_spec(cfg, mesh, rules_table)
    abstract_flat, sharding_flat = leaves(abstract), leaves(shardings)
    rules = family.rules(cfg)
    _plan(rules, abstract_flat, family)
    resolve = _resolver(reader, family)
    _check_unused(reader, rules, family, abstract_flat, resolve)
    out = {}
    for rule in rules:
        targets = {path: abstract_flat[path] for path in rule.ours}
        out.update(_load_rule(rule, lambda at, rule=rule: reader.get(resolve(rule.name(at))), targets, sharding_flat))
    return nest(out)


def _load_rule(rule: Rule, read, targets: dict[str, Any], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Our arrays of one rule (`targets`: path -> ShapeDtypeStruct). `read(at)` gives the HF tensor of
    leading index `at` (unit[, expert]); each is read once, and only if a shard on this host holds it.
    A shard is a range per axis; identical shards (replicated axes) share one host buffer."""
    shapes = [t.shape[rule.lead:] for t in targets.values()]
    lead_shape = next(iter(targets.values())).shape[:rule.lead]
    buffers: dict[tuple[int, tuple[range, ...]], np.ndarray] = {}  # (part, shard ranges) -> its values
    placed: dict[str, list[tuple[jax.Device, tuple[range, ...]]]] = {}
    for part, (path, target) in enumerate(targets.items()):
        placed[path] = []
        for device, index in shardings[path].addressable_devices_indices_map(target.shape).items():
            ranges = tuple(range(n)[i] for n, i in zip(target.shape, index))
            if (part, ranges) not in buffers:
                buffers[part, ranges] = np.empty([len(r) for r in ranges], target.dtype)
            placed[path].append((device, ranges))
    for at in itertools.product(*map(range, lead_shape)):
        wanted = [(part, ranges) for part, ranges in buffers if all(a in r for a, r in zip(at, ranges))]
        if not wanted:
            continue
        parts = to_ours(rule, read(at), shapes)
        for part, ranges in wanted:
            where = tuple(r.index(a) for a, r in zip(at, ranges))
            inner = tuple(slice(r.start, r.stop, r.step) for r in ranges[rule.lead:])
            buffers[part, ranges][where] = parts[part][inner]
    return {
        path: jax.make_array_from_single_device_arrays(
            target.shape, shardings[path],
            [jax.device_put(buffers[part, ranges], device) for device, ranges in placed[path]])
        for part, (path, target) in enumerate(targets.items())
    }


def _resolver(reader: SafetensorsReader, family: Family):
    """HF names with or without the backbone prefix ("model.", "bert.", ...): checkpoints of a bare
    backbone (BertModel) or old ones (gpt2) store them without it."""
    names = reader.names()

    def resolve(name: str) -> str:
        if name in names:
            return name
        if family.base_prefix and name.startswith(family.base_prefix) and name[len(family.base_prefix):] in names:
            return name[len(family.base_prefix):]
        raise ConversionError(f"tensor {name!r} is missing from the checkpoint")

    return resolve


def _check_unused(reader, rules: list[Rule], family: Family, abstract_flat: dict[str, Any], resolve) -> None:
    """A tensor we would silently drop means a model we do not fully implement: refuse it."""
    expected = set()
    for rule in rules:
        for at in itertools.product(*map(range, abstract_flat[rule.ours[0]].shape[:rule.lead])):
            expected.add(resolve(rule.name(at)))
    ignored = [re.compile(p) for p in family.ignored]
    extra = sorted(n for n in reader.names() - expected if not any(p.search(n) for p in ignored))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ConversionError(f"the checkpoint has tensors jaxllm does not use ({shown}): an unsupported variant of {family.name}")


def hf_tokenizer_files_of(directory: Path) -> dict[str, bytes]:
    """The tokenizer files of a Hugging Face model directory (tokenizer.json or tokenizer.model, configs,
    chat_template.jinja), as `Tokenizer.files()` holds them."""
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


@dataclasses.dataclass
class HFModel:
    """A converted model: its ModelConfig, graphdef, sharded params and (when present) tokenizer."""

    config: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Any
    mesh: Mesh

    @property
    def model(self):
        return models.bind(self.graphdef, self.params)


def from_hf(path: str | Path, devices: Sequence[jax.Device] | None = None, param_dtype: str | None = None,
            mesh: Mesh | None = None, adapter: str | Path | None = None,
            rules: sharding.Rules | None = None) -> HFModel:
    """A ready model from a Hugging Face directory (config.json + safetensors [+ tokenizer files]).

    Parameters are sharded fsdp-style over `devices` (default: all) unless a `mesh` is given, by
    `rules` (default: `sharding.DEFAULT_RULES`). With `adapter` (a PEFT LoRA directory) the model
    carries those adapters (`config.lora`).
    """
    from jaxllm.data.tokenizer import load_tokenizer_from_files

    path = Path(path)
    hf_config, reader = read_hf_config(path), SafetensorsReader(path)
    cfg = config_from_hf(hf_config, param_dtype, reader)
    mesh = mesh or sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    rules = rules if rules is not None else sharding.make_rules()
    params = _load_params(reader, family_of(hf_config), cfg, mesh, rules)
    if adapter is not None:
        def placement(c):
            return models.sharded_spec(c, mesh, rules)[2]

        params, cfg = load_peft_adapters(adapter, params, cfg, placement)
    files = hf_tokenizer_files_of(path)
    tokenizer = load_tokenizer_from_files(files) if "tokenizer.json" in files or "tokenizer.model" in files else None
    return HFModel(cfg, models.model_spec(cfg)[0], params, tokenizer, mesh)


def save_hf(params: Any, cfg: ModelConfig, out_dir: str | Path, tokenizer_files: dict[str, bytes] | None = None,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None) -> Path:
    """Writes config.json, safetensors (sharded above `max_shard_bytes`) and tokenizer files. A reward model's
    `pad_token_id` goes into config.json: *ForSequenceClassification reads the last token that is not it."""
    _check_config(cfg)
    family = family_for(cfg)
    out_dir = Path(out_dir)
    flat = leaves(params)
    rules = family.rules(cfg)
    _plan(rules, flat, family)
    np_dtype = DTYPES[dtype or cfg.param_dtype]
    writer = ShardedWriter(out_dir, max_shard_bytes)
    for rule in rules:
        for at in itertools.product(*map(range, flat[rule.ours[0]].shape[:rule.lead])):
            parts = [_host(flat[p][at]).astype(np_dtype) for p in rule.ours]
            writer.add(rule.name(at), to_hf(rule, parts))
    if jax.process_index() == 0:
        writer.finish()
        hf_cfg = family.config_to_hf(cfg)
        hf_cfg["dtype"] = dtype or cfg.param_dtype
        if pad_token_id is not None:
            hf_cfg["pad_token_id"] = pad_token_id
        atomic_write_text(out_dir / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True))
        for name, data in (tokenizer_files or {}).items():
            atomic_write_bytes(out_dir / name, data)
    return out_dir


VALUE_HEAD_FILE = "value_head.safetensors"


def _save_value_head(params: Any, cfg: ModelConfig, out_dir: Path) -> tuple[Any, ModelConfig]:
    """PPO's value head is not part of a CausalLM: written apart to value_head.safetensors under TRL's
    AutoModelForCausalLMWithValueHead names (v_head.summary.weight [1, D], v_head.summary.bias [1], float32);
    returns the parameters and config without it."""
    from safetensors.numpy import save

    head = params["value_head"]
    tensors = {"v_head.summary.weight": np.ascontiguousarray(_host(head["kernel"]).astype(np.float32).T),
               "v_head.summary.bias": np.ascontiguousarray(_host(head["bias"]).astype(np.float32))}
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / VALUE_HEAD_FILE, save(tensors))
    log.warning("the PPO value head is not part of a causal LM: written apart to %s (TRL's v_head.summary.* "
                "names); the model files hold the LM alone", out_dir / VALUE_HEAD_FILE)
    return {k: v for k, v in params.items() if k != "value_head"}, dataclasses.replace(cfg, value_head=False)


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_to_jaxllm(src: str | Path, out: str | Path, param_dtype: str | None = None,
                 adapter: str | Path | None = None) -> Path:
    """Converts a HF directory into a jaxllm run directory (config.yaml + checkpoints/0) that
    `jaxllm generate --run-dir OUT` and `train.init_from=OUT` accept; with `adapter` (a PEFT LoRA
    directory) the model carries those adapters (model.lora). A model with fewer ids than its tokenizer
    (tokens added without `resize_token_embeddings`) grows to fit, as `train.init_from` grows one."""
    from jaxllm.models.vocab import grown_vocab_size, resize_vocab
    from jaxllm.train.checkpoint import Checkpointer

    loaded = from_hf(src, param_dtype=param_dtype, adapter=adapter)
    model_cfg, params = loaded.config, loaded.params
    if loaded.tokenizer is not None and loaded.tokenizer.vocab_size > model_cfg.vocab_size:
        old = model_cfg.vocab_size
        params, model_cfg = resize_vocab(params, model_cfg, grown_vocab_size(loaded.tokenizer.vocab_size))
        log.warning("model vocabulary %d -> %d: the tokenizer has %d ids; new embedding rows are the mean of the old",
                    old, model_cfg.vocab_size, loaded.tokenizer.vocab_size)
    out = Path(out)
    cfg = Config(run_dir=str(out), model=model_cfg,
                 data=DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)))
    files = hf_tokenizer_files_of(Path(src))
    checkpointer = Checkpointer(out / "checkpoints")
    step = jax.device_put(np.int32(0), jax.sharding.NamedSharding(loaded.mesh, jax.sharding.PartitionSpec()))
    checkpointer.save(0, {"params": params, "step": step}, None, dump_yaml(cfg), files)
    checkpointer.close()
    if jax.process_index() == 0:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return out


def jaxllm_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30, adapters_only: bool = False) -> Path:
    """A Hugging Face model directory from a run or checkpoint. A LoRA/QLoRA run is merged into its
    base (dequantised) first; `adapters_only` writes its adapters alone in PEFT's format instead."""
    from jaxllm.infer.load import load_model
    from jaxllm.models import lora

    loaded = load_model(checkpoint)
    model_cfg, params = loaded.config.model, loaded.params
    if model_cfg.value_head:
        params, model_cfg = _save_value_head(params, model_cfg, Path(out_dir))
    if adapters_only:
        return save_peft_adapters(params, model_cfg, out_dir)
    if model_cfg.lora is not None or model_cfg.quant is not None:
        params, model_cfg = lora.merge(params, model_cfg), lora.base_config(model_cfg)
    tokenizer_files = hf_tokenizer_files(loaded.tokenizer, loaded.config.data) if loaded.tokenizer else {}
    pad = loaded.tokenizer.pad_id if loaded.tokenizer is not None and model_cfg.head == "reward" else None
    if pad is not None and pad == loaded.tokenizer.eos_id:
        log.warning("the tokenizer pads with its EOS id %d: transformers' %s reads a reward at the last token that is "
                    "not padding, one before the EOS that jaxllm reads it at", pad, family_for(model_cfg).name)
    return save_hf(params, model_cfg, out_dir, tokenizer_files, dtype, max_shard_bytes, pad)
