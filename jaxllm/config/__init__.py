"""Typed configuration: dataclasses are the schema, YAML files are instances, `a.b.c=value` overrides.

Validation happens once, at load. Every error is a `ConfigError` whose message names the key, what was
wrong, and the fix (the closest valid key for a typo).

- `schema`: the dataclasses (one per section) and the error types;
- `loading`: YAML in and out, dotted overrides, typed conversion of raw values;
- `checks`: `validate`, the checks across keys that run after loading.
"""

from jaxllm.config.checks import validate
from jaxllm.config.loading import (
    apply_override,
    config_from_yaml_text,
    dump_yaml,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)
from jaxllm.config.schema import (
    AdversarialConfig,
    BestOfNConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DenoiserConfig,
    DistillConfig,
    DistributedConfig,
    ElectraGenerator,
    EvalConfig,
    GenerateConfig,
    JaxllmError,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    ObjectiveConfig,
    OptimConfig,
    PreferenceConfig,
    QuantConfig,
    RewardSpec,
    RLConfig,
    RopeScaling,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "AdversarialConfig", "BestOfNConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DenoiserConfig", "DistillConfig",
    "DistributedConfig",
    "ElectraGenerator", "EvalConfig", "GenerateConfig", "JaxllmError", "LoraConfig", "MeshConfig", "ModelConfig",
    "MoEConfig", "ObjectiveConfig", "OptimConfig", "PreferenceConfig", "QuantConfig", "RewardSpec", "RLConfig", "RopeScaling", "SourceConfig", "TokenizerConfig",
    "TrainConfig", "apply_override", "config_from_yaml_text", "dump_yaml", "from_dict", "load_config", "read_yaml",
    "to_dict", "validate",
]
