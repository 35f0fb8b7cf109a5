"""lm-evaluation-harness with jaxllm as its backend, against the harness's own Hugging Face backend (HFLM) on
the same tiny random Llama: per-request log-likelihoods within 1e-4, greedy flags, generated texts and task
metrics equal; `jaxllm eval` writes the harness's files; eval.tasks logs task metrics during training."""

import json
import math

import pytest

from jaxllm.cli import main
from jaxllm.config import ConfigError, load_config
from jaxllm.convert.hf import hf_to_jaxllm
from jaxllm.eval.harness import load_lm, score_rows
from jaxllm.eval.tasks import flat_metrics, run_tasks
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics
from tests.eval.harness_fixtures import task_dir, tiny_llama_dir

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    hf = tiny_llama_dir(root / "hf")
    run = hf_to_jaxllm(hf, root / "run")
    return hf, run, task_dir(root / "tasks")


def _logp(response):
    return response[0] if isinstance(response, (tuple, list)) else response


def test_jaxllm_backend_matches_the_harness_hf_backend(models):
    from lm_eval.models.huggingface import HFLM

    hf, run, tasks = models
    ours = run_tasks(load_lm(run, batch_size=8), TASKS, include_path=str(tasks), log_samples=True, bootstrap_iters=0)
    theirs = run_tasks(HFLM(pretrained=str(hf), device="cpu", batch_size=8), TASKS, include_path=str(tasks),
                       log_samples=True, bootstrap_iters=0)
    requests = 0
    for task in TASKS:
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) > 0
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            assert a["arguments"] == b["arguments"]
            for (x,), (y,) in zip(a["resps"], b["resps"]):
                requests += 1
                if task == "tiny_gen":
                    assert x == y  # greedy text, cut at the stop sequences as HFLM cuts it
                else:
                    assert abs(_logp(x) - _logp(y)) <= 1e-4, (task, x, y)
                    if task == "tiny_mc":
                        assert x[1] == y[1]  # is_greedy
    assert requests == 19 + 3 + 5  # every choice of 6 questions, 3 documents, 5 prompts
    # The stop sequences took effect: some generation was cut before its 12 tokens.
    texts = [s["resps"][0][0] for s in ours["samples"]["tiny_gen"]]
    assert any("o" not in t and len(t) < 20 for t in texts), texts
    ours_m, theirs_m = flat_metrics(ours), flat_metrics(theirs)
    assert set(ours_m) == {"eval/tiny_mc/acc", "eval/tiny_mc/acc_norm", "eval/tiny_ppl/word_perplexity",
                           "eval/tiny_ppl/byte_perplexity", "eval/tiny_ppl/bits_per_byte", "eval/tiny_gen/exact_match"}
    for name, value in ours_m.items():
        assert math.isclose(value, theirs_m[name], rel_tol=1e-6), (name, value, theirs_m[name])
        if name.endswith(("acc", "acc_norm", "exact_match")):
            assert value == theirs_m[name]


def test_eval_command_writes_the_harness_results_and_samples(models, tmp_path, capsys):
    hf, _, tasks = models
    out = tmp_path / "out"
    assert main(["eval", str(hf), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "3",
                 "--batch-size", "8", "--output-path", str(out), "--log-samples"]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc_norm" in table
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert set(results["results"]["tiny_mc"]) >= {"acc,none", "acc_norm,none"}
    assert results["config"]["model_name"] == str(hf)
    (samples_file,) = out.rglob("samples_tiny_mc_*.jsonl")
    assert len(samples_file.read_text().splitlines()) == 3


def test_bench_against_hf_reports_both_backends(models):
    from jaxllm.eval.cli import bench_against_hf

    hf, _, tasks = models
    result = bench_against_hf(str(hf), ["tiny_mc"], limit=2, num_fewshot=None, batch_size=8, include_path=str(tasks))
    assert result["requests"] == 4 + 3  # the choices of the first two questions
    assert result["jaxllm"]["requests_per_sec"] > 0 and result["hf"]["requests_per_sec"] > 0
    assert result["max_abs_loglikelihood_difference"] <= 1e-4
    assert result["metrics"]["jaxllm"] == result["metrics"]["hf"] != {}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "unknown lm-evaluation-harness task(s) no_such_task"),
    (["--tasks", "tiny_mc", "--include-path", "/nonexistent/tasks"], "task directory /nonexistent/tasks does not exist"),
])
def test_eval_command_bad_input_is_one_line(models, capsys, monkeypatch, argv, message):
    import jaxllm.eval.tasks as eval_tasks

    hf, _, tasks = models
    # An unknown name is looked up among the harness's ~15,000 built-in task files too; stand in for that
    # index (tens of seconds to build) with the test's own tasks.
    local = eval_tasks._manager
    monkeypatch.setattr(eval_tasks, "_manager", lambda paths, defaults: local(paths, False))
    extra = [] if "--include-path" in argv else ["--include-path", str(tasks)]
    assert main(["eval", str(hf), *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_training_logs_task_metrics_on_live_parameters_without_recompiling(models, tmp_path):
    _, _, tasks = models
    overrides = [
        "model.vocab_size=4096", "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "train.steps=4",
        "train.progress_bar=false", "checkpoint.every=100", "eval.every=2", "eval.tasks=[tiny_mc]",
        "eval.tasks_limit=4", f"eval.include_path={tasks}", f"run_dir={tmp_path}",
    ]
    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.run(stop_at_step=2)
        compiled = score_rows._cache_size()
        trainer.run()
        assert score_rows._cache_size() == compiled  # the second evaluation reused the first one's programs
    finally:
        trainer.close()
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "eval/tiny_mc/acc" in r}
    assert sorted(rows) == [2, 4]
    assert all(0.0 <= r["eval/tiny_mc/acc"] <= 1.0 and "eval/tiny_mc/acc_norm" in r for r in rows.values())


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=encoder", "model.head=mlm"], "eval.tasks scores lm-evaluation-harness tasks with decoder models"),
    (["eval.tasks_limit=0"], "eval.tasks_limit must be > 0"),
    (["eval.tasks_num_fewshot=-1"], "eval.tasks_num_fewshot must be >= 0 or null"),
])
def test_eval_tasks_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*overrides, "eval.tasks=[tiny_mc]"])


def _samples(out):
    return {f.name.split("_")[1] + "_" + f.name.split("_")[2]: [json.loads(line) for line in f.read_text().splitlines()]
            for f in out.rglob("samples_*.jsonl")}


@pytest.mark.slow
def test_two_processes_score_their_shares_and_process_0_writes_what_one_process_does(models, tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    hf, _, tasks = models
    root = Path(__file__).parents[2]
    args = ["eval", str(hf), "--tasks", ",".join(TASKS), "--include-path", str(tasks), "--batch-size", "8",
            "--log-samples"]
    proc = subprocess.run(
        [sys.executable, str(root / "launch" / "multihost_local.py"), "--num-processes", "2",
         "--devices-per-process", "4", "--timeout", "400", "--", sys.executable, "-m", "jaxllm.cli", *args,
         "--output-path", str(tmp_path / "two")], capture_output=True, text=True, timeout=450, cwd=root)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("|tiny_mc |") == 1  # process 0 alone prints the table
    assert main([*args, "--output-path", str(tmp_path / "one")]) == 0
    two, one = _samples(tmp_path / "two"), _samples(tmp_path / "one")
    assert sorted(two) == sorted(one) == sorted(TASKS)
    for task in TASKS:
        by_doc = {s["doc_id"]: s for s in two[task]}
        assert sorted(by_doc) == sorted(s["doc_id"] for s in one[task])  # every example, once
        for s in one[task]:
            theirs = by_doc[s["doc_id"]]
            # The files hold responses as strings; a request the harness repeated to even out the processes'
            # shares has its response twice.
            for (x, *_), (y, *_) in zip(s["resps"], theirs["resps"]):
                if task == "tiny_gen":
                    assert x == y
                else:
                    assert abs(float(_logp(x)) - float(_logp(y))) <= 1e-5 and x[1:] == y[1:]
            assert s["metrics"] == theirs["metrics"] and all(s[m] == theirs[m] for m in s["metrics"]
                                                             if task != "tiny_ppl")


def test_objects_cross_processes_as_plain_data():
    """What the processes exchange (requests, lm-eval's raw metrics keyed by (metric, filter), logged samples)
    survives the tagged-JSON round trip exactly; nothing is pickled."""
    import json

    import numpy as np

    from jaxllm.eval.harness import _from_json, _to_json

    value = {("acc", "none"): [1.0, 0.0], ("word_perplexity", "none"): [(-12.5, 7), (-3.0, 2)],
             "samples": [{"doc": {"q": "a"}, "resps": [["x"]], "arr": np.arange(3, dtype=np.int64)}],
             "args": [("context", {"until": ["\n"], "max_gen_toks": 8})], "count": np.int64(4)}
    back = _from_json(json.loads(json.dumps(_to_json(value))))
    arr = back["samples"][0].pop("arr")
    np.testing.assert_array_equal(arr, np.arange(3)) and arr.dtype == np.int64
    value["samples"][0].pop("arr")
    assert back == {**value, "count": 4} and isinstance(back["args"][0], tuple)
