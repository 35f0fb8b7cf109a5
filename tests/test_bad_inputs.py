"""Bad inputs that had no test elsewhere; docs/faults.md lists every bad input and the test that covers it.

Each is checked through `jaxllm.cli.main` where a user would meet it: exit status 2 and one line
`error: ...` that says what was wrong and the fix, never a traceback.
"""

import shutil
from pathlib import Path

import pytest

from jaxllm.cli import main
from jaxllm.config import ConfigError, load_config
from jaxllm.data import ASSETS
from jaxllm.data.tokenizer import train_sentencepiece
from jaxllm.train.loop import Trainer
from tests.train.test_loop import MICRO

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_yaml_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- steps\n")
    assert f"{path} must hold a mapping of config sections, found list" in _one_line_error(["train", str(path)], capsys)


def test_no_data_sources():
    with pytest.raises(ConfigError, match=r"data.sources is empty; list at least one source \(e.g. path: builtin:kjv"):
        load_config(None, ["data.sources=[]"])


def test_spike_settings_out_of_range():
    with pytest.raises(ConfigError, match=r"train.spike_threshold must be >= 0 \(0 = off\)"):
        load_config(None, ["train.spike_threshold=-1"])


def test_a_learning_rate_that_ascends_is_refused(capsys, tmp_path):
    # (the impossible mesh stops the run fast should the learning rate pass)
    line = _one_line_error(["train", TINY, "optim.lr=-1", "mesh.data=1024", f"run_dir={tmp_path}"], capsys)
    assert line == "error: optim.lr must be > 0 (e.g. 3e-4; a learning rate <= 0 does not descend), got -1.0"


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    line = _one_line_error(["train", TINY, *MICRO, "model.vocab_size=1000", f"run_dir={tmp_path}"], capsys)
    assert "model.vocab_size=1000 is too small: the tokenizer has 4096 ids, 4096 in all; set model.vocab_size >= 4096" in line


def test_another_tokenizer_on_resume_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [*MICRO, f"run_dir={run_dir}"])
    trainer = Trainer(cfg)
    try:
        trainer.save()  # a checkpoint at step 0 is all this needs
    finally:
        trainer.close()
    same = tmp_path / "copy.model"  # the same tokenizer under another path is fine
    shutil.copy(ASSETS / "kjv-sp4k.model", same)
    Trainer(load_config(TINY, [*MICRO, f"run_dir={run_dir}", f"tokenizer.path={same}"])).close()

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i} of a small corpus, for a small tokenizer" for i in range(200)))
    other = train_sentencepiece([str(corpus)], str(tmp_path / "other"), vocab_size=300)
    line = _one_line_error(["train", TINY, *MICRO, f"run_dir={run_dir}", f"tokenizer.path={other.name}"], capsys)
    assert f"holds checkpoints trained with tokenizer builtin:kjv-sp4k, but tokenizer.path is {other.name}" in line
    assert "use a new run_dir or tokenizer.path=builtin:kjv-sp4k" in line
