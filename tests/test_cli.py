"""The `jaxllm` command as a user runs it: train, generate, data tools, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.cli import main
from jaxllm.data.tokenizer import load_tokenizer
from tests.train.test_loop import MICRO

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    code = main(["train", TINY, *MICRO, "train.steps=6", f"run_dir={run_dir}", "eval.every=3", "eval.batches=2"])
    assert code == 0
    return run_dir


def test_train_prints_a_sample_and_writes_the_run(trained_run, capsys):
    assert (trained_run / "metrics.jsonl").is_file()
    assert (trained_run / "checkpoints" / "6").is_dir()
    import json

    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "eval_loss" in rows[2] and "eval_ppl" in rows[5] and "eval_loss" not in rows[3]


def test_generate_from_run_dir_and_checkpoint(trained_run, capsys):
    code = main(["generate", "--run-dir", str(trained_run), "--prompt", "And God", "--prompt", "In the",
                 "--max-new-tokens", "5", "--temperature", "0"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("And God") and out[2].startswith("In the") and out[1] == "---"
    code = main(["generate", "--checkpoint", str(trained_run / "checkpoints" / "6"), "--prompt", "And God",
                 "--max-new-tokens", "5", "--temperature", "0"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0] == out[0]  # greedy: the same continuation


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", TINY, "trian.steps=3"], "error: unknown config key 'trian'; did you mean 'train'?"),
        (["train", TINY, "data.sources.0.path=/no/such/*.jsonl", "run_dir=RUN"], "/no/such/*.jsonl"),
        (["train", TINY, "train.batch_size=12", "mesh.data=8", "run_dir=RUN"], "multiple of 8"),
        (["generate", "--run-dir", "/no/such/run", "--prompt", "x"], "error: checkpoint path /no/such/run does not exist"),
        (["train", "no_such.yaml"], "error: config file no_such.yaml does not exist"),
        # overrides after the options reach the config (argparse alone calls them unrecognized arguments)
        (["bench", TINY, "--peer", "none", "model.d_modle=3"], "error: unknown config key 'model.d_modle'"),
        (["plan", TINY, "--topology", "v5e-4", "train.steps=2", "trian.steps=3"], "error: unknown config key 'trian'"),
    ],
)
def test_errors_are_one_line(argv, message, capsys, tmp_path):
    argv = [a.replace("RUN", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "jaxllm.cli", "train", TINY, "model.d_modle=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown config key 'model.d_modle'; did you mean 'd_model'?"
    assert "Traceback" not in proc.stderr


LIBTPU_NOISE = ("could not determine TPU", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT", "Logging before InitGoogle")


@pytest.mark.parametrize("argv", [["train", TINY, "mesh.data=1024", "run_dir=RUN"],
                                  ["plan", TINY, "--topology", "v5e-4", "train.batch_size=2"]])
def test_no_libtpu_noise_off_a_tpu_vm(argv, tmp_path):
    """With libtpu installed, JAX would load it on any machine and libtpu would print its failed TPU
    probe; `jaxllm` keeps JAX off the TPU platform there, and `plan` (which loads libtpu to compile)
    names one host so libtpu stays quiet. Both commands here initialise their devices, then stop."""
    pytest.importorskip("libtpu")
    from jaxllm.platforms import on_tpu_vm

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    # Another process holding libtpu's lock file would make libtpu give up before its probe (and its noise).
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    if on_tpu_vm(env):
        pytest.skip("a TPU VM: libtpu is meant to initialise here")
    argv = [a.replace("RUN", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "jaxllm.cli", *argv], capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert [n for n in LIBTPU_NOISE if n in proc.stderr] == [], proc.stderr
    if argv[0] == "train":
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: mesh data*fsdp")
    else:
        assert proc.returncode == 0 and "v5e-4: 4 v5e chips" in proc.stdout


def test_data_train_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(300)))
    code = main(["data", "train-tokenizer", "--input", str(corpus), "--vocab-size", "300",
                 "--output", str(tmp_path / "tok")])
    assert code == 0
    tok = load_tokenizer(str(tmp_path / "tok.model"))
    assert tok.vocab_size == 300
    text = "the lazy dog jumps"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "100"], "prompt of 3 tokens + 100 new tokens = 103 exceeds the model's context of 64"),
        (["--temperature", "-1"], "generate: temperature must be >= 0, top_p in (0, 1], top_k >= 0"),
    ],
)
def test_generate_errors_are_one_line(trained_run, capsys, options, message):
    assert main(["generate", "--run-dir", str(trained_run), "--prompt", "And God", *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
