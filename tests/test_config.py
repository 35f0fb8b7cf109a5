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

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
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


def test_malformed_yaml_names_line(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n   bad: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
