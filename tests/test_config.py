import pytest

from jaxllm.config import Config, ConfigError, apply_override, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  d_model: 128\n  num_heads: 4\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "optim.lr=1e-3", "data.sources.0.path=a.jsonl", "run_dir=/tmp/r"])
    assert cfg.model.d_model == 128 and cfg.train.steps == 9
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.sources[0].path == "a.jsonl" and cfg.data.sources[0].text_field == "text"
    assert cfg.run_dir == "/tmp/r"


def test_list_override_appends_a_new_source():
    raw = {}
    apply_override(raw, "data.sources.0.path=a.txt")
    apply_override(raw, "data.sources.1.path=b.txt")
    apply_override(raw, "data.sources.1.weight=0.5")
    assert raw == {"data": {"sources": [{"path": "a.txt"}, {"path": "b.txt", "weight": 0.5}]}}


def test_bundled_configs_load():
    from pathlib import Path

    from jaxllm.config.loading import read_yaml
    from jaxllm.dataprep.prepare import PrepareConfig, load_prepare_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:  # training configs, and data-preparation configs (`jaxllm data prepare`)
        if "prepare" in read_yaml(path):
            assert isinstance(load_prepare_config(path), PrepareConfig)
        else:
            assert isinstance(load_config(path), Config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_modle=3"], "unknown config key 'model.d_modle'; did you mean 'd_model'"),
        (["trian.steps=3"], "unknown config key 'trian'; did you mean 'train'"),
        (["train.steps=many"], "train.steps must be an integer, got str 'many'"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["optim.name=adam"], "optim.name must be one of adamw, adafactor, lion, got 'adam'; did you mean 'adamw'"),
        (["model.num_kv_heads=3"], "model.num_heads=8 must be a multiple of model.num_kv_heads=3"),
        (["train.batch_size=10", "train.grad_accum=4"], "does not divide into train.grad_accum=4"),
        (["data.seq_len=4096"], "data.seq_len=4096 is longer than model.max_seq_len=2048"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
        (["train.steps"], "must look like key.path=value"),
        (["model.scan_layers=maybe"], "model.scan_layers must be true or false"),
    ],
)
def test_errors_name_the_problem_and_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


ENCODER = ["model.arch=encoder", "model.head=discriminator"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1"], "optim.lr must be > 0 (e.g. 3e-4; a learning rate <= 0 does not descend), got -1.0"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.lr=nan"], "optim.lr must be > 0"),
        (["optim.eps=0"], "optim.eps must be > 0 (e.g. 1e-8)"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0 (0 = no warmup), got -1"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0 (0 = off), got -0.1"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be in [0, 1], got 1.5"),
        (["optim.b1=1"], "optim.b1 must be in [0, 1) (AdamW: b1 0.9, b2 0.95), got 1"),
        (["optim.b2=-0.5"], "optim.b2 must be in [0, 1)"),
        (["optim.grad_clip=0"], "optim.grad_clip must be > 0 (e.g. 1.0) or null for no clipping"),
        (["train.seed=-1"], "train.seed must be >= 0, got -1"),
        (["train.z_loss=-1"], "train.z_loss must be >= 0 (0 = off)"),
        (["train.loss_chunk=-1"], "train.loss_chunk must be >= 0 (0 = all positions at once)"),
        (["data.seed=-2"], "data.seed must be >= 0, got -2"),
        (["checkpoint.keep_every=0"], "checkpoint.keep_every must be >= 1 or null (= no extra checkpoints kept)"),
        (["distributed.heartbeat_timeout_s=0"], "distributed.heartbeat_timeout_s must be >= 1, got 0"),
        (["distributed.num_processes=0"], "distributed.num_processes must be >= 1 or null"),
        (["generate.max_new_tokens=0"], "generate.max_new_tokens must be >= 1"),
        (["generate.seed=-1"], "generate.seed must be >= 0"),
        (["model.num_decoder_layers=0"], "model.num_decoder_layers must be >= 1 or null (= model.num_layers)"),
        (["model.num_kv_heads=0"], "model.num_kv_heads must be >= 1 or null"),
        (["model.head_dim=0"], "model.head_dim must be >= 1 or null"),
        (["model.embed_dim=0"], "model.embed_dim must be >= 1 or null"),
        (["model.relative_buckets=0"], "model.relative_buckets must be >= 1"),
        (["model.relative_max_distance=0"], "model.relative_max_distance must be >= 1"),
        (["model.type_vocab_size=-1"], "model.type_vocab_size must be >= 0 (0 = no token-type embeddings)"),
        (["model.norm_eps=0"], "model.norm_eps must be > 0 (e.g. 1e-5)"),
        (["model.rope_theta=-1"], "model.rope_theta must be > 0"),
        (["model.init_std=0"], "model.init_std must be > 0"),
        (["model.rope_scaling.factor=0"], "model.rope_scaling.factor must be > 0"),
        (["model.rope_scaling.low_freq_factor=-1"], "model.rope_scaling.low_freq_factor must be > 0"),
        (["model.rope_scaling.high_freq_factor=0"], "model.rope_scaling.high_freq_factor must be > 0"),
        (["model.rope_scaling.high_freq_factor=1"], "high_freq_factor=1.0 must be above low_freq_factor=1.0"),
        (["model.rope_scaling.original_max_position_embeddings=0"], "original_max_position_embeddings must be >= 1"),
        ([*ENCODER, "model.electra_generator.d_model=0"], "model.electra_generator.d_model must be >= 1 or null"),
        ([*ENCODER, "model.electra_generator.discriminator_weight=-1"], "discriminator_weight must be >= 0"),
    ],
)
def test_numbers_outside_their_domain(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_warmup_longer_than_the_run_is_a_warning(caplog):
    cfg = load_config(None, ["train.steps=50", "optim.warmup_steps=50"])
    assert cfg.optim.warmup_steps == 50
    assert "optim.warmup_steps=50 is not shorter than train.steps=50: the warmup is cut to 49 steps" in caplog.text
    caplog.clear()
    load_config(None, ["train.steps=51", "optim.warmup_steps=50"])
    assert "warmup" not in caplog.text


def test_malformed_yaml_names_line(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n   bad: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
