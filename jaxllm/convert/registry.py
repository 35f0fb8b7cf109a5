"""Which conversion family a model is, and the flat view of parameter trees that conversions walk.

Shared by `convert.hf` (whole models) and `convert.peft` (adapters); importing it registers every family.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.convert import families_encoders, families_moe  # noqa: F401  (register their families)
from jaxllm.convert.families import FAMILIES, Family
from jaxllm.convert.hf_io import ConversionError


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family of a Hugging Face config.json."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"model_type {model_type!r} is not supported; jaxllm converts {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def family_for(cfg: ModelConfig) -> Family:
    """The family our `cfg` exports as (`model.family`)."""
    if cfg.family in FAMILIES:
        return FAMILIES[cfg.family]
    raise ConversionError(
        f"model.family={cfg.family!r}: set it to the Hugging Face model_type to export as "
        f"({', '.join(sorted(FAMILIES))}); the architecture must match that family"
    )


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"layers/attn/q/kernel": leaf, ...} of a nested dict."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(leaves(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of `leaves`' output."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree
