"""Reward functions for online RL: the built-ins' rules, TRL's combination rule, loading `module:function`."""

import gzip
import json
import logging
import math

import numpy as np
import pytest

from jaxllm.config import ConfigError, JaxllmError, RewardSpec, SourceConfig, from_dict
from jaxllm.data import ASSETS
from jaxllm.data.sources import BUILTIN_CORPORA, make_source
from jaxllm.rl import verifiable
from jaxllm.rl.rewards import check_reward_specs, compute_rewards, reward_functions, reward_metrics


def _one(name, completions, answers=None, **args):
    funcs = reward_functions([RewardSpec(name, args=args)])
    records = [{"answer": a} for a in answers] if answers is not None else [{}] * len(completions)
    return compute_rewards(funcs, ["p"] * len(completions), completions, records)[1][funcs[0][0]].tolist()


def _nan_list(values):
    return [None if math.isnan(v) else v for v in values]


def test_exact_match_strips_the_end_of_turn_and_whitespace_and_optionally_case():
    completions = ["Genesis", " Genesis\n</s>", "Genesis<|im_end|>junk", "genesis", "Genesis 1", "Exodus",
                   [{"role": "assistant", "content": "Genesis</s>"}]]
    assert _one("exact_match", completions, ["Genesis"] * 7) == [1, 1, 1, 0, 0, 0, 1]
    assert _one("exact_match", completions, ["Genesis"] * 7, ignore_case=True) == [1, 1, 1, 1, 0, 0, 1]
    assert _one("exact_match", ["the  Song\nof Songs", "the Song of Songs"], ["the Song of Songs"] * 2) == [0, 1]
    assert _one("exact_match", ["the  Song\nof Songs"], ["the Song of Songs"], normalize_whitespace=True) == [1]
    # a record without an answer is not scored; the answer field is configurable
    assert _nan_list(_one("exact_match", ["a", "a"], [None, "a"])) == [None, 1]
    funcs = reward_functions([{"function": "exact_match", "args": {"answer_field": "solution"}}])
    assert compute_rewards(funcs, ["p"], ["42"], [{"solution": "42"}])[0].tolist() == [1]
    with pytest.raises(JaxllmError, match="no field 'answer'.*'solution'.*args.answer_field"):
        compute_rewards(reward_functions([RewardSpec("exact_match")]), ["p"], ["42"], [{"solution": "42"}])


@pytest.mark.parametrize("text,value", [
    ("The answer is 42.", 42), ("-3", -3), ("+7 apples", 7), ("1,234,567 people", 1234567), ("3.25", 3.25),
    (".5", 0.5), ("x = 3/4", 0.75), ("-3/4", -0.75), ("12, 34", 34), ("costs 3.", 3), ("50%", 50),
    ("first 1 then \\boxed{\\frac{1}{2}} then 9", 0.5), ("\\boxed{-12}", -12), ("from 3-4", 4), ("x2 y", None),
    ("no number", None), ("\\boxed{1,000} is 7", 1000), ("2 / 8", 0.25), ("\\dfrac{3}{4}", 0.75),
])
def test_numbers_are_read_as_documented(text, value):
    got = verifiable.number_in(text)
    assert got == value if value is None else math.isclose(got, value)


def test_numeric_reward_compares_the_last_number_within_a_tolerance():
    completions = ["so 1,234", "It is 1234.0000001", "1235", "none", "3/4", "0.75", "-0.75"]
    answers = ["1234", "1234", "1234", "1234", "0.75", "3/4", "0.75"]
    assert _one("numeric", completions, answers) == [1, 1, 0, 0, 1, 1, 0]
    assert _one("numeric", ["1235"], ["1234"], rel_tol=0.01) == [1]
    # GSM8K answers: the number after ####; an answer without a number (or None) is not scored
    assert _nan_list(_one("numeric", ["72", "72", "72"], ["48 + 24 = 72\n#### 72", "n/a", None])) == [1, None, None]
    assert _one("numeric", ["1/0"], ["5"]) == [0]  # a zero denominator equals nothing


def test_format_reward_full_match_or_search():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    completions = ["<think>a\nb</think>\n<answer>4</answer>", "<think>a</think><answer>4</answer> extra",
                   "pre <think>a</think><answer>4</answer>", "<answer>4</answer>"]
    assert _one("format", completions, pattern=pattern) == [1, 0, 0, 0]
    assert _one("format", completions, pattern=pattern, mode="search") == [1, 1, 1, 0]
    assert _one("format", completions[:1], pattern=pattern, dotall=False) == [0]  # . no longer crosses lines
    assert _one("format", ["<think>a</think><answer>4</answer></s>"], pattern=pattern) == [1]  # EOS text cut


def test_length_is_dapos_soft_overlong_punishment_on_token_ids():
    funcs = reward_functions([{"function": "length", "args": {"max_length": 100, "cache": 20}}])
    ids = [[1] * n for n in (10, 80, 90, 100, 101)]
    _, per = compute_rewards(funcs, ["p"] * 5, ["c"] * 5, [{}] * 5, completion_ids=ids)
    np.testing.assert_allclose(per["length"], [0, 0, -0.5, -1, -1])
    assert _one("length", ["x" * 7], max_length=8, cache=2) == [-0.5]  # characters without completion_ids


def test_weighted_sum_over_the_functions_that_scored_and_trls_metrics(caplog):
    def half(prompts, completions, **fields):
        return [0.5 if f == "math" else None for f in fields["task"]]

    funcs = [("em", 2.0, lambda prompts, completions, **f: [1.0, None, 0.0]), ("half", 0.5, half)]
    records = [{"task": "math", "answer": "a"}, {"task": "text", "answer": "b"}, {"task": "math", "answer": "c"}]
    with caplog.at_level(logging.WARNING, logger="jaxllm"):
        total, per = compute_rewards(funcs, ["p1", "p2", "p3"], ["a", "b", "c"], records)
    assert _nan_list(total.tolist()) == [2.25, None, 0.25]  # TRL: nansum; unscored by all -> NaN, warned
    assert "no reward function scored 1 of 3 completions" in caplog.text and "'p2'" in caplog.text
    assert _nan_list(per["em"].tolist()) == [1.0, None, 0.0]
    metrics = reward_metrics(total, per)
    assert metrics["rewards/em/mean"] == 0.5 and math.isclose(metrics["rewards/em/std"], math.sqrt(0.5))
    assert metrics["rewards/half/mean"] == 0.5 and metrics["rewards/half/std"] == 0.0
    assert metrics["reward"] == 1.25 and math.isclose(metrics["reward_std"], math.sqrt(2.0))


def test_functions_get_the_records_fields_and_completion_ids_as_columns():
    seen = {}

    def spy(prompts, completions, **fields):
        seen.update(prompts=prompts, completions=completions, **fields)
        return [0.0] * len(completions)

    records = [{"prompt": "x", "answer": "1", "task": "t"}, {"prompt": "x", "answer": "1"}]
    compute_rewards([("spy", 1.0, spy)], ["x", "x"], ["a", "b"], records, completion_ids=[[1], [2, 3]], step=7)
    assert seen == {"prompts": ["x", "x"], "completions": ["a", "b"], "answer": ["1", "1"], "task": ["t", None],
                    "completion_ids": [[1], [2, 3]], "step": 7}


def test_module_and_file_functions_with_their_args_and_unique_names(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import dataclasses\nwith open(__file__ + '.runs', 'a') as f:\n    f.write('x')\n"
        "@dataclasses.dataclass\nclass Settings:\n    bonus: float = 0.0\n"  # needs its module in sys.modules
        "def shout(prompts, completions, bonus=0.0, **kw):\n    return [float(c.isupper()) + bonus for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = [{"function": "my_rewards:shout"}, {"function": f"{tmp_path}/my_rewards.py:shout", "args": {"bonus": 1}},
             {"function": "exact_match", "name": "em", "weight": 0.5}]
    funcs = reward_functions(specs)
    assert [(n, w) for n, w, _ in funcs] == [("shout", 1.0), ("shout_2", 1.0), ("em", 0.5)]
    total, per = compute_rewards(funcs, ["p", "p"], ["HI", "hi"], [{"answer": "HI"}, {"answer": "x"}])
    assert per["shout_2"].tolist() == [2.0, 1.0] and total.tolist() == [3.5, 1.0]
    file_spec = [{"function": f"{tmp_path}/my_rewards.py:shout"}]
    check_reward_specs(file_spec), reward_functions(file_spec)
    assert (tmp_path / "my_rewards.py.runs").read_text() == "xx"  # imported once as my_rewards, once as a file


@pytest.mark.parametrize("spec,message", [
    ({"function": "exact_mach"}, "neither a built-in reward .*exact_match.* nor 'module:function'"),
    ({"function": "no_such_module_xyz:f"}, "cannot import module 'no_such_module_xyz'"),
    ({"function": "json:no_such"}, "json has no 'no_such'"),
    ({"function": "math:pi"}, "math:pi is a float, not a function"),
    ({"function": "missing_file.py:f"}, "reward file missing_file.py does not exist"),
    ({"function": "exact_match", "args": {"answer_feld": "a"}},
     "rl.rewards.0.args: exact_match takes no argument 'answer_feld'; its arguments: answer_field, ignore_case, "
     "normalize_whitespace, stop"),
    ({"function": "exact_match", "args": [1]}, "args must be a mapping"),
    ({"function": "format"}, "args.pattern is missing"),
    ({"function": "format", "args": {"pattern": "(unclosed"}}, "not a valid regex"),
    ({"function": "format", "args": {"pattern": "a", "mode": "all"}}, "mode must be fullmatch, search or match"),
    ({"function": "length"}, "max_length must be a positive integer"),
    ({"function": "length", "args": {"max_length": 10, "cache": 11}}, "cache must be an integer in 1..max_length"),
    ({"function": "numeric", "weight": float("nan")}, "weight must be a finite number"),
])
def test_bad_reward_specs_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        reward_functions([spec])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):
        check_reward_specs([spec])


def test_bad_return_values_are_one_line_errors():
    for returned, message in (([1.0], "returned 1 rewards for 2 completions"), (3.0, "returned a float"),
                              (["x", 1.0], "returned 'x' for completion 0")):
        with pytest.raises(JaxllmError, match=message):
            compute_rewards([("bad", 1.0, lambda p, c, r=returned, **f: r)], ["p", "p"], ["a", "b"], [{}, {}])


def test_reward_specs_load_from_config_dicts():
    spec = from_dict(RewardSpec, {"function": "format", "weight": 2, "args": {"pattern": "x"}})
    assert spec == RewardSpec("format", 2.0, {"pattern": "x"})
    with pytest.raises(ConfigError, match="unknown config key 'rewards.funtion'"):
        from_dict(RewardSpec, {"funtion": "x"}, "rewards")
    with pytest.raises(ConfigError, match="rl.rewards is empty; name at least one reward"):
        reward_functions([])


def test_bundled_prompt_sets_are_the_sft_sets_checkable_tasks():
    def read(name):
        with gzip.open(ASSETS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    rl, valid, sft_valid = read("kjv-rl"), read("kjv-rl-valid"), read("kjv-sft-valid")
    assert len(rl) == 7342 and len(valid) == 696
    assert all(set(r) == {"prompt", "answer", "task"} and r["prompt"][0]["role"] == "user" for r in rl + valid)
    assert [(r["prompt"][0]["content"], r["answer"], r["task"]) for r in valid] == [
        (m["messages"][0]["content"], m["messages"][1]["content"], m["task"]) for m in sft_valid]
    held_out = {r["prompt"][0]["content"] for r in valid}
    # held-out chapters: the one shared prompt is a verse that dozens of chapters repeat word for word
    assert held_out & {r["prompt"][0]["content"] for r in rl} == {
        "Which book of the Bible is this verse from?\nAnd the word of the LORD came unto me, saying,"}
    for task, corpus in (("book", "kjv-rl-valid-book"), ("first_word", "kjv-rl-valid-first-word"),
                         ("last_word", "kjv-rl-valid-last-word")):
        c = BUILTIN_CORPORA[corpus]
        assert {r["task"] for r in valid[c.start:c.stop]} == {task}
    # the data pipeline's sources read them whole (as online RL reads its prompts)
    source = make_source(SourceConfig(path="builtin:kjv-rl-valid-last-word"), num_epochs=1, convert=lambda r: r)
    assert list(source) == valid[464:696]


# ------------------------------------------------------------------------------------------ model rewards


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random reward model (Hugging Face directory whose tokenizer carries the zephyr chat template) and a
    tiny random judge (a jaxllm run converted from a random Llama), both with the bundled tokenizer."""
    from jaxllm.convert.hf import hf_to_jaxllm, save_hf
    from jaxllm.data.chat_template import load_chat_template
    from jaxllm.data.tokenizer import load_tokenizer
    from tests.conftest import random_params, tiny_model_config

    tmp = tmp_path_factory.mktemp("model_rewards")
    tok = load_tokenizer("builtin:kjv-sp4k")
    rm = tiny_model_config(vocab_size=tok.vocab_size, head="reward", family="llama", max_seq_len=128)
    files = {**tok.files(), "chat_template.jinja": load_chat_template("builtin:zephyr").source.encode()}
    save_hf(random_params(rm, seed=1), rm, tmp / "rm", files, pad_token_id=tok.pad_id)
    judge = tiny_model_config(family="llama", vocab_size=4096, max_seq_len=256)
    save_hf(random_params(judge, seed=0, std=0.3), judge, tmp / "judge_hf", tok.files())
    hf_to_jaxllm(tmp / "judge_hf", tmp / "judge")
    return tmp


def test_reward_model_reward_is_jaxllm_scores_score_of_the_same_row(model_dirs, tmp_path):
    from jaxllm.infer.score import score_file

    conversation = [{"role": "user", "content": "Which book?"}]
    prompts = ["In the beginning", "And God said", conversation, "Jesus", conversation]
    completions = [" God created the heaven and the earth.", ", Let there be light.",
                   [{"role": "assistant", "content": "Genesis"}], " wept.",
                   [{"role": "assistant", "content": "The book of the prophet Isaiah, son of Amoz"}]]
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_file(model_dirs / "rm", tmp_path / "rows.jsonl", tmp_path / "scored.jsonl", batch_size=2, progress=False)
    expected = [json.loads(line)["score"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]

    funcs = reward_functions([{"function": "reward_model", "args": {"path": str(model_dirs / "rm"), "batch_size": 2},
                               "weight": 0.5}])
    total, per = compute_rewards(funcs, prompts, completions, [{"answer": "x"}] * 5)
    np.testing.assert_allclose(per["reward_model"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, 0.5 * np.asarray(expected, np.float32), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(expected, 6))) == 5  # five different texts, five different scores
    reward = funcs[0][2]
    assert reward.sequences(prompts[2:3], completions[2:3])[0] != reward.sequences(prompts[4:5], completions[4:5])[0]

    # every rollout calls the reward again: the scoring program is traced and compiled once, not once per call
    import jax.monitoring

    events = []

    def listen(name, *args, **kwargs):
        events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        np.testing.assert_allclose(reward(prompts, completions), expected, rtol=1e-5, atol=1e-6)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not [e for e in events if "trace" in e or "compile" in e]


def test_judge_reward_is_the_judges_probability_that_the_completion_beats_the_reference(model_dirs):
    from jaxllm.infer.judge import Judge, open_model

    prompts = [[{"role": "user", "content": "Which book of the Bible is this verse from?\nJesus wept."}],
               "Continue: In the beginning", "Continue: In the beginning", "no reference"]
    completions = [[{"role": "assistant", "content": "John</s>"}], " God created the heaven.", " heaven the God.",
                   " anything"]
    records = [{"answer": "John", "task": "book"}, {"answer": " God created the heaven and the earth."},
               {"answer": " God created the heaven and the earth."}, {"answer": None}]
    funcs = reward_functions([{"function": "judge", "args": {"path": str(model_dirs / "judge"), "batch_size": 2}}])
    total, per = compute_rewards(funcs, prompts, completions, records)

    judge = Judge(open_model(model_dirs / "judge"), batch_size=3, progress=False)
    verdicts = judge.compare([("Which book of the Bible is this verse from?\nJesus wept.", "John", "John"),
                              ("Continue: In the beginning", " God created the heaven.", records[1]["answer"]),
                              ("Continue: In the beginning", " heaven the God.", records[2]["answer"])])
    np.testing.assert_allclose(per["judge"][:3], [v.prob_a for v in verdicts], rtol=1e-5)
    assert math.isnan(per["judge"][3]) and math.isnan(total[3])  # no reference: not scored
    assert per["judge"][0] == pytest.approx(0.5, abs=1e-6)  # the completion is the reference: a tie
    assert 0 < per["judge"][1] < 1 and per["judge"][1] != per["judge"][2]


@pytest.mark.parametrize("args,message", [
    ({}, "args.path is missing: the reward_model reward needs"),
    ({"path": "/no/such/run"}, "args.path /no/such/run does not exist"),
    ({"path": ".", "batch": 2}, "reward_model takes no argument 'batch'; its arguments: path, batch_size"),
    ({"path": ".", "batch_size": 0}, "args.batch_size must be a positive integer, got 0"),
])
def test_bad_model_reward_specs(args, message):
    with pytest.raises(ConfigError, match=message):
        reward_functions([{"function": "reward_model", "args": args}])
    with pytest.raises(ConfigError, match=message):  # the same checks when a config loads, nothing loaded
        check_reward_specs([{"function": "reward_model", "args": args}])


def test_specs_check_without_loading_models(model_dirs):
    specs = [{"function": "judge", "args": {"path": str(model_dirs / "judge")}}, {"function": "exact_match",
                                                                                  "args": None}]
    assert check_reward_specs(specs) == ["judge", "exact_match"]  # `args:` left empty in YAML is no args


# ------------------------------------------------------------------------------------------ held-out reward


def test_held_out_reward_batches_in_buckets_and_scores_each_prompts_own_completions(model_dirs):
    from jaxllm.config import GenerateConfig
    from jaxllm.infer.generate import generate
    from jaxllm.infer.judge import open_model
    from jaxllm.rl.evaluate import PromptEncoder, held_out_reward

    model = open_model(model_dirs / "judge")
    records = [{"prompt": p, "answer": "x", "task": t} for p, t in (
        ("In the beginning God", "a"), ("And", "b"), ("And the earth was without form, and void", "a"),
        ("Jesus wept", "b"))]
    seen = []

    def spy(prompts, completions, completion_ids, task, **fields):
        seen.append((prompts, completions, completion_ids))
        return [float(len(ids) % 2) for ids in completion_ids]  # some 0, some 1

    funcs = [("odd", 1.0, spy), ("em", 1.0, lambda p, c, **f: [None] * len(c))]
    metrics = held_out_reward(model, records, funcs, samples=3, max_new_tokens=5, batch_size=4)
    encode = PromptEncoder(model)
    (g_prompts, _, g_ids), (s_prompts, s_completions, s_ids) = seen
    assert g_prompts == [r["prompt"] for r in records] and s_prompts == [r["prompt"] for r in records for _ in "abc"]
    # greedy, sorted by length into a batch: each prompt's own completion (the same batch in record order)
    assert sorted(records, key=lambda r: len(encode(r))) != records
    assert g_ids == generate(model.graphdef, model.params, model.config.model, [encode(r) for r in records],
                             GenerateConfig(max_new_tokens=5, temperature=0.0), encode.stops, model.tokenizer.pad_id,
                             width=16)
    assert s_completions == [model.tokenizer.decode(ids) for ids in s_ids]
    odd = np.asarray([len(ids) % 2 for ids in g_ids], float)
    assert metrics["greedy/reward"] == pytest.approx(odd.mean()) and metrics["greedy/rewards/odd/mean"] == \
        pytest.approx(odd.mean())
    assert metrics["greedy/reward/a"] == pytest.approx(odd[[0, 2]].mean())
    sampled = np.asarray([len(ids) % 2 for ids in s_ids], float).reshape(4, 3)
    assert metrics["sampled/reward"] == pytest.approx(sampled.mean())
    assert metrics["sampled/pass@3"] == pytest.approx((sampled.max(axis=1) > 0).mean())
    assert math.isnan(metrics["greedy/rewards/em/mean"])


def test_conversational_prompts_are_rendered_as_training_renders_them(model_dirs):
    import dataclasses

    from jaxllm.data.chat import ChatEncoder
    from jaxllm.data.chat_template import load_chat_template
    from jaxllm.infer.judge import open_model
    from jaxllm.rl.evaluate import PromptEncoder

    model = open_model(model_dirs / "judge")
    with pytest.raises(JaxllmError, match="prompts in the messages format need a chat template"):
        PromptEncoder(model)({"prompt": [{"role": "user", "content": "Hi"}]})
    data = model.config.data
    data = dataclasses.replace(data, objective=dataclasses.replace(data.objective, chat_template="builtin:zephyr"))
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, data=data))
    prompt = [{"role": "user", "content": "Which book of the Bible is this verse from?\nJesus wept."}]
    ids = PromptEncoder(model)({"prompt": prompt})
    full, mask = ChatEncoder(model.tokenizer, load_chat_template("builtin:zephyr")).encode(
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "John"}]})
    assert full[:len(ids)] == ids and mask[:len(ids)] == [0] * len(ids) and mask[len(ids)] == 1
