"""Hugging Face checkpoints in and out: `from_hf`, `load_hf_params`, `save_hf`, and the two
`jaxllm convert` directions.

Loading streams tensor by tensor into the sharded target: every device shard is filled by a callback
that reads (memory-mapped) only the HF tensors of the layers it holds, so no host ever holds the whole
model. Saving gathers one layer's tensor at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm import models, sharding
from jaxllm.config import Config, DataConfig, MeshConfig, ModelConfig, dump_yaml
from jaxllm.convert import families_encoders, families_moe  # noqa: F401  (register their families)
from jaxllm.convert.families import FAMILIES, Family
from jaxllm.convert.hf_io import ConversionError, SafetensorsReader, ShardedWriter, read_hf_config
from jaxllm.convert.rules import Rule, to_hf, to_ours
from jaxllm.utils import atomic_write_bytes, atomic_write_text

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt")


def family_of(hf_config: dict[str, Any]) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"model_type {model_type!r} is not supported; jaxllm converts {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


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


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_leaves(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


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
    _check_config(cfg)
    hf_cfg = read_hf_config(directory)
    family = family_of(hf_cfg)
    reader = SafetensorsReader(directory)
    _, abstract, shardings = models.sharded_spec(cfg, mesh, rules_table)
    abstract_flat, sharding_flat = _leaves(abstract), _leaves(shardings)
    rules = family.rules(cfg)
    plan = _plan(rules, abstract_flat, family)
    resolve = _resolver(reader, family)
    _check_unused(reader, rules, family, abstract_flat, resolve)
    out = {}
    for path, (rule, part) in plan.items():
        target = abstract_flat[path]
        shapes = [abstract_flat[p].shape[rule.lead:] for p in rule.ours]
        memo: dict[tuple, np.ndarray] = {}

        def read(index, rule=rule, part=part, shapes=shapes, target=target, memo=memo):
            # Called once per device shard; identical shards (replicated axes) are read once. Only the
            # layers (and experts) of this shard are read.
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in memo:
                lead = [range(n)[i] for n, i in zip(target.shape[:rule.lead], index[:rule.lead])]
                blocks = [to_ours(rule, reader.get(resolve(rule.name(at))), shapes)[part][index[rule.lead:]]
                          for at in itertools.product(*lead)]
                memo[key] = np.stack(blocks).reshape(*map(len, lead), *blocks[0].shape).astype(target.dtype)
            return memo[key]

        out[path] = jax.make_array_from_callback(target.shape, sharding_flat[path], read)
    return _nest(out)


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


def _read_tokenizer_files(directory: Path) -> dict[str, bytes]:
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
            mesh: Mesh | None = None) -> HFModel:
    """A ready model from a Hugging Face directory (config.json + safetensors [+ tokenizer files]).

    Parameters are sharded fsdp-style over `devices` (default: all) unless a `mesh` is given.
    """
    from jaxllm.data.tokenizer import load_tokenizer_from_files

    path = Path(path)
    cfg = config_from_hf(read_hf_config(path), param_dtype, SafetensorsReader(path))
    mesh = mesh or sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    params = load_hf_params(path, cfg, mesh, sharding.make_rules())
    files = _read_tokenizer_files(path)
    tokenizer = load_tokenizer_from_files(files) if "tokenizer.json" in files or "tokenizer.model" in files else None
    return HFModel(cfg, models.model_spec(cfg)[0], params, tokenizer, mesh)


def _family_for(cfg: ModelConfig) -> Family:
    if cfg.family in FAMILIES:
        return FAMILIES[cfg.family]
    raise ConversionError(
        f"model.family={cfg.family!r}: set it to the Hugging Face model_type to export as "
        f"({', '.join(sorted(FAMILIES))}); the architecture must match that family"
    )


def save_hf(params: Any, cfg: ModelConfig, out_dir: str | Path, tokenizer_files: dict[str, bytes] | None = None,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes config.json, safetensors (sharded above `max_shard_bytes`) and tokenizer files."""
    _check_config(cfg)
    family = _family_for(cfg)
    out_dir = Path(out_dir)
    flat = _leaves(params)
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
        atomic_write_text(out_dir / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True))
        for name, data in (tokenizer_files or {}).items():
            atomic_write_bytes(out_dir / name, data)
    return out_dir


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_to_jaxllm(src: str | Path, out: str | Path, param_dtype: str | None = None,
                 adapter: str | Path | None = None) -> Path:
    """Converts a HF directory into a jaxllm run directory (config.yaml + checkpoints/0) that
    `jaxllm generate --run-dir OUT` and `train.init_from=OUT` accept; with `adapter` (a PEFT LoRA
    directory) the model carries those adapters (model.lora)."""
    from jaxllm.convert.peft import load_peft_adapters
    from jaxllm.train.checkpoint import Checkpointer

    loaded = from_hf(src, param_dtype=param_dtype)
    model_cfg, params = loaded.config, loaded.params
    if adapter is not None:
        def placement(c):
            return models.sharded_spec(c, loaded.mesh, sharding.make_rules())[2]

        params, model_cfg = load_peft_adapters(adapter, params, model_cfg, placement)
    out = Path(out)
    cfg = Config(run_dir=str(out), model=model_cfg,
                 data=DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)))
    files = _read_tokenizer_files(Path(src))
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
    from jaxllm.convert.peft import save_peft_adapters
    from jaxllm.infer.load import load_model
    from jaxllm.models import lora

    loaded = load_model(checkpoint)
    model_cfg, params = loaded.config.model, loaded.params
    if adapters_only:
        return save_peft_adapters(params, model_cfg, out_dir)
    if model_cfg.lora is not None or model_cfg.quant is not None:
        params, model_cfg = lora.merge(params, model_cfg), lora.base_config(model_cfg)
    return save_hf(params, model_cfg, out_dir, loaded.tokenizer_files, dtype, max_shard_bytes)
