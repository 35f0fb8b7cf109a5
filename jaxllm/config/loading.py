"""YAML in and out, dotted overrides, and the typed conversion of raw values into the schema."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxllm.config.checks import validate
from jaxllm.config.schema import Config, ConfigError

def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML file (or the defaults when `path` is None), applies `a.b=value` overrides, validates."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    _resolve_algorithm(raw, {item.split("=", 1)[0].strip() for item in overrides})
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def _resolve_algorithm(raw: dict[str, Any], overridden: set[str]) -> None:
    """rl.algorithm and data.objective.name name an online method alike, and either alone decides the other:
    rl.algorithm ppo | grpo | rloo trains that objective, best_of_n fine-tunes with sft; an online objective
    (grpo, rloo, ppo) is its own algorithm. An override of one (`overridden`: the dotted keys overridden) replaces
    the config file's other. Both given and different: checks.py says which to change."""
    rl, data = raw.get("rl"), raw.get("data")
    if not isinstance(rl, dict) and rl is not None or not isinstance(data, dict) and data is not None:
        return  # not sections: from_dict names the error
    objective = (data or {}).get("objective")
    if "rl.algorithm" in overridden and "data.objective.name" not in overridden and isinstance(objective, dict):
        objective.pop("name", None)
    if "data.objective.name" in overridden and "rl.algorithm" not in overridden and isinstance(rl, dict):
        rl.pop("algorithm", None)
    algorithm = (rl or {}).get("algorithm")
    name = objective.get("name") if isinstance(objective, dict) else None
    if algorithm is not None and name is None and (objective is None or isinstance(objective, dict)):
        raw["data"] = {**(data or {}), "objective": {**(objective or {}), "name": "sft" if algorithm == "best_of_n"
                                                     else algorithm}}
    elif algorithm is None and name in ("grpo", "rloo", "ppo"):
        raw["rl"] = {**(rl or {}), "algorithm": name}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, found {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Applies one `a.b.c=value` override to the raw nested dict (lists indexed by number: `a.0.b=v`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.steps=100)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
            continue
        child = node.get(part)
        if child is None:
            child = [] if parts[i + 1].isdigit() else {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if idx == len(node):
            node.append(value)
        else:
            _list_item(node, last, key)
            node[idx] = value
    else:
        node[last] = value


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit():
        raise ConfigError(f"override key {where}: {part!r} indexes a list, use a number (e.g. data.sources.0.path)")
    idx = int(part)
    while len(node) <= idx:
        node.append({})
    return node[idx]


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            full = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        full = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_describe(value)}")
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {_describe(value)}")
    raise TypeError(f"unsupported config type {tp} at {where}")  # a schema bug, not a user error


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str) -> Config:
    """Rebuilds a Config saved with `dump_yaml` (e.g. from a run directory or checkpoint)."""
    cfg = from_dict(Config, yaml.safe_load(text))
    validate(cfg)
    return cfg
