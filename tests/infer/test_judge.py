"""`jaxllm judge`: pairwise verdicts from a judge's label probabilities in both orders, preference data,
win-rates with Wilson intervals, critique-and-revise, and one-line errors for bad input."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import models, sharding
from jaxllm.cli import main
from jaxllm.config import Config, JaxllmError, MeshConfig
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer.feedback import win_rate
from jaxllm.infer.judge import DEFAULT_TEMPLATE, Judge, Verdict, fill, open_model, wilson_interval
from jaxllm.infer.load import LoadedModel
from tests.conftest import random_params, tiny_model_config

PAIRS = [
    {"prompt": "Who created the heaven?", "response_a": "God created the heaven and the earth.",
     "response_b": "And the earth was without form."},
    {"prompt": "Let there be", "completions": ["light: and there was light.", "darkness upon the deep"]},
    {"prompt": [{"role": "user", "content": "Who saw the light?"}],  # TRL's conversational format
     "response_a": [{"role": "assistant", "content": "God saw the light."}],
     "response_b": [{"role": "assistant", "content": "The deep."}]},
    {"prompt": "Same twice", "response_a": "And God saw the light.", "response_b": "And God saw the light."},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two jaxllm runs converted from random tiny Llamas (different seeds) with the bundled tokenizer; the
    context fits the default template."""
    from jaxllm.convert.hf import hf_to_jaxllm, save_hf

    root = tmp_path_factory.mktemp("judge")
    cfg = tiny_model_config(family="llama", vocab_size=4096, max_seq_len=256)
    files = load_tokenizer("builtin:kjv-sp4k").files()
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        save_hf(random_params(cfg, seed=seed, std=0.3), cfg, root / f"hf_{name}", files)
        out[name] = hf_to_jaxllm(root / f"hf_{name}", root / f"run_{name}")
        out[f"hf_{name}"] = root / f"hf_{name}"
    return out


def _replicated(params):
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def test_both_orders_cancel_a_judge_that_only_sees_positions():
    """A judge whose logits ignore its input (final norm scaled to 0, a logits bias favouring "A") answers "A"
    with probability sigmoid(4) in both orders: the order-averaged verdict is exactly a tie."""
    cfg = tiny_model_config(family="llama", vocab_size=4096, max_seq_len=256, logits_bias=True)
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    params = random_params(cfg)
    params["final_norm"]["scale"] = jnp.zeros_like(params["final_norm"]["scale"])
    label_a, label_b = tokenizer.encode("Answer: A")[-1], tokenizer.encode("Answer: B")[-1]
    params["lm_head"]["bias"] = params["lm_head"]["bias"].at[:].set(0.0).at[label_a].set(4.0)
    model = LoadedModel(Config(model=cfg), models.model_spec(cfg)[0], _replicated(params), tokenizer, {}, 0)
    judge = Judge(model, batch_size=2, progress=False)
    assert judge.encode("p", "x", "y")[1] == (label_a, label_b)
    verdicts = judge.compare([(p["prompt"], p["response_a"], p["response_b"]) for p in (PAIRS[0], PAIRS[3])])
    for v in verdicts:
        assert v.prob_a_first == pytest.approx(1 / (1 + math.exp(-4.0)), abs=1e-6)  # a strong position bias
        assert v.prob_a_first == v.prob_b_first
        assert (v.prob_a, v.winner, v.confidence) == (0.5, "tie", 0.5)


def test_label_probabilities_equal_a_direct_forward_pass(runs):
    """Padded, bucketed, batched label log-probabilities = the forward pass of each rendered prompt alone; the
    verdict is sigmoid(logp_A - logp_B) per order; a chat template frames the judge's prompt."""
    model = open_model(runs["a"])
    forward = jax.jit(lambda params, ids: models.bind(model.graphdef, params)(ids)[0][0, -1])
    short = "{prompt}|{response_a}|{response_b} Answer:"
    items = [("In the beginning", "God created", "the heaven and the earth " * k) for k in (1, 6)]
    judge = Judge(model, short, batch_size=1, progress=False)
    rows = [judge.encode(p, a, b) for p, a, b in items] + [judge.encode(p, b, a) for p, a, b in items]
    assert rows[0][0] == [model.tokenizer.bos_id] + model.tokenizer.encode(fill(short, *items[0]))
    got = judge.label_logprobs(rows)  # two buckets (32, 64), the rows split over batches of 2
    for (ids, labels), logp in zip(rows, got):
        expected = jax.nn.log_softmax(forward(model.params, jnp.asarray([ids])))[jnp.asarray(labels)]
        np.testing.assert_allclose(logp, expected, atol=2e-5)
    verdicts = judge.compare(items)
    for k, v in enumerate(verdicts):
        first, second = got[k], got[k + len(items)]
        assert v.prob_a_first == pytest.approx(1 / (1 + math.exp(first[1] - first[0])), abs=1e-5)
        assert v.prob_b_first == pytest.approx(1 / (1 + math.exp(second[1] - second[0])), abs=1e-5)
    # The Hugging Face directory the run was converted from judges alike.
    from_hf = Judge(open_model(runs["hf_a"]), short, batch_size=1, progress=False).compare(items)
    assert [v.prob_a for v in from_hf] == pytest.approx([v.prob_a for v in verdicts], abs=1e-5)
    chat = load_tokenizer("builtin:kjv-sp4k")
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    judge = Judge(dataclasses.replace(model, tokenizer=chat), short, progress=False)
    ids, labels = judge.encode(*items[0])  # no BOS: a chat template writes its own
    assert ids == chat.encode(f"user: {fill(short, *items[0])}\nassistant:")
    assert labels == (chat.token_to_id("A"), chat.token_to_id("B"))  # right after "assistant:", no space
    expected = jax.nn.log_softmax(forward(model.params, jnp.asarray([ids])))[jnp.asarray(labels)]
    np.testing.assert_allclose(judge.label_logprobs([(ids, labels)])[0], expected, atol=2e-5)
    # A template that writes `</s>` (zephyr): the judge reads EOS's id there, as training and transformers'
    # apply_chat_template tokenize it, not the characters "</s>" (`encode` would give those).
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    ids, _ = Judge(dataclasses.replace(model, tokenizer=chat), short, progress=False).encode(*items[0])
    assert ids.count(chat.eos_id) == 1
    assert ids != chat.encode(f"<|user|>\n{fill(short, *items[0])}</s>\n<|assistant|>\n")


def test_judge_cli_writes_a_preference_dataset_the_dpo_format_reads(runs, tmp_path, capsys):
    from jaxllm.config import DataConfig, ObjectiveConfig, SourceConfig
    from jaxllm.data import preference  # noqa: F401 (registers the dpo batch format, as the trainer imports it)
    from jaxllm.data.pipeline import make_pipeline

    data, out = tmp_path / "pairs.jsonl", tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert main(["judge", "--judge", str(runs["a"]), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    assert "wrote 3 preference pairs of 4" in capsys.readouterr().out  # the identical pair is a tie
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    judge = Judge(open_model(runs["a"]), progress=False)
    texts = [("Who created the heaven?", "God created the heaven and the earth.", "And the earth was without form."),
             ("Let there be", "light: and there was light.", "darkness upon the deep"),
             ("Who saw the light?", "God saw the light.", "The deep.")]  # a conversation's one message: its text
    verdicts = judge.compare(texts)
    assert len(rows) == 3
    for row, pair, verdict in zip(rows, PAIRS, verdicts):
        a, b = pair.get("completions") or (pair["response_a"], pair["response_b"])  # kept as they came
        assert row["prompt"] == pair["prompt"] and row["winner"] == verdict.winner
        assert (row["chosen"], row["rejected"]) == ((a, b) if verdict.winner == "a" else (b, a))
        assert row["confidence"] == pytest.approx(verdict.confidence) and 0.5 < row["confidence"] <= 1
        assert row["confidence"] == pytest.approx((row["chosen_prob_first"] + row["chosen_prob_second"]) / 2)
    # data.objective.name=dpo reads the file as it is: three pairs, chosen (odd) and rejected (even) segments.
    cfg = DataConfig(sources=[SourceConfig(path=str(out))], seq_len=64, shuffle_window=0, prefetch=0,
                     objective=ObjectiveConfig(name="dpo", chat_template="builtin:zephyr"))
    batch = next(make_pipeline(cfg, load_tokenizer("builtin:kjv-sp4k"), 4, 0, 1, num_epochs=1))
    segments = [s for row in batch["segment_ids"] for s in range(1, row.max() + 1)]
    assert [s % 2 for s in segments] == [1, 0] * 3 and batch["loss_mask"].sum() > 0
    # Pairs labelled already (prompt + chosen + rejected): the judge's agreement with the labels is reported.
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": b}) + "\n" for p, a, b in texts))
    assert main(["judge", "--judge", str(runs["a"]), "--data", str(labelled), "--out", str(out)]) == 0
    agree = sum(v.winner == "a" for v in verdicts)
    assert f"agrees with the given chosen/rejected labels on {agree} of 3 pairs, 0 ties: {agree / 3:.3f}" in \
        capsys.readouterr().out
    threshold = max(r["confidence"] for r in rows) + 1e-9
    assert main(["judge", "--judge", str(runs["a"]), "--data", str(data), "--out", str(out),
                 "--min-confidence", str(threshold)]) == 0
    assert "wrote 0 preference pairs of 4 to" in capsys.readouterr().out and out.read_text() == ""


def test_templates_and_prompt_files(tmp_path):
    from jaxllm.infer.feedback import read_prompts
    from jaxllm.infer.judge import load_template

    template = tmp_path / "judge.txt"
    template.write_text('{"q": "{prompt}", "answers": ["{response_a}", "{response_b}"]} Better:')
    assert load_template(str(template)) == template.read_text() and load_template(None) == DEFAULT_TEMPLATE
    # One pass: braces elsewhere stay, and a placeholder inside a response is not filled again.
    filled = fill(template.read_text(), "p {response_b}", "x", "y")
    assert filled == '{"q": "p {response_b}", "answers": ["x", "y"]} Better:'
    (tmp_path / "p.txt").write_text("first\n\nsecond {x}\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "first"}\n{"prompt": [{"role": "user", "content": "second"}]}\n')
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second {x}"]
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["first", "second"]


def test_labelled_pairs_without_a_prompt_use_the_shared_beginning(tmp_path):
    from jaxllm.infer.feedback import read_jsonl

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"chosen": "And God saw the light", "rejected": "And God saw the dark"}) + "\n")
    (record,) = read_jsonl(str(path), ["prompt", "response_a", "response_b"], conversations=True)
    assert (record["prompt"], record["response_a"], record["response_b"]) == ("And God saw the", " light", " dark")


def test_wilson_interval_and_win_rate_on_known_counts():
    low, high = wilson_interval(8, 10)  # the textbook example: 8 of 10
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    verdicts = [Verdict(0.9, 0.2)] * 3 + [Verdict(0.6, 0.6)] + [Verdict(0.3, 0.8)] + [None]
    report = win_rate(verdicts)
    assert (report["wins_a"], report["wins_b"], report["ties"], report["too_long"]) == (3, 1, 1, 1)
    assert report["win_rate_a"] == 3.5 / 5 and report["ci95"] == list(wilson_interval(3.5, 5))
    assert report["first_position_preference"] == pytest.approx((3 * 1.1 + 1.2 + 1.1) / 10)


def test_win_rate_of_two_models(runs, tmp_path, capsys):
    prompts, report = tmp_path / "prompts.txt", tmp_path / "report.json"
    prompts.write_text("In the beginning\nAnd God said\n")
    assert main(["judge", "--judge", str(runs["a"]), "--prompts", str(prompts), "--model-a", str(runs["a"]),
                 "--model-b", str(runs["b"]), "--max-new-tokens", "3", "--temperature", "0",
                 "--report", str(report), "--out", str(tmp_path / "judged.jsonl")]) == 0
    assert "win-rate of A over B:" in capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["comparisons"] == 2 and r["wins_a"] + r["wins_b"] + r["ties"] == 2
    assert r["win_rate_a"] == (r["wins_a"] + r["ties"] / 2) / 2
    assert r["ci95"][0] <= r["win_rate_a"] <= r["ci95"][1]
    judged = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert sorted(row["winner"] for row in judged) == ["a"] * r["wins_a"] + ["b"] * r["wins_b"]


def test_critique_and_revise_writes_revisions_as_chosen(runs, tmp_path, capsys):
    data, out = tmp_path / "responses.jsonl", tmp_path / "revised.jsonl"
    data.write_text(json.dumps({"prompt": "Who made light?", "response": "The sun."}) + "\n")
    assert main(["judge", "--judge", str(runs["a"]), "--data", str(data), "--out", str(out), "--revise",
                 "--principle", "Quote the scripture.", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert "revised pairs of 1" in capsys.readouterr().out
    for row in map(json.loads, out.read_text().splitlines()):
        assert row["rejected"] == "The sun." and row["chosen"].strip() and row["chosen"] != row["rejected"]
        assert row["principle"] == "Quote the scripture." and "critique" in row


def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys):
    judge = ["judge", "--judge", str(runs["a"])]
    bad = tmp_path / "bad.jsonl"
    template = tmp_path / "t.txt"
    template.write_text("{prompt} {response_a}")

    def error(argv, content=None):
        if content is not None:
            bad.write_text(content)
        assert main(argv) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and message.startswith("error: ")
        return message

    data = [*judge, "--data", str(bad), "--out", str(tmp_path / "o.jsonl")]
    assert "bad.jsonl:2: the record lacks 'response_b'" in error(
        data, '{"prompt":"p","response_a":"x","response_b":"y"}\n{"prompt":"p","response_a":"x"}\n')
    assert "'completions' must be a list of exactly two" in error(data, '{"prompt":"p","completions":["x","y","z"]}\n')
    assert "bad.jsonl:1: not valid JSON" in error(data, "{oops\n")
    assert "field 'prompt' must be a string or a list of chat messages" in error(
        data, '{"prompt":[{"role":"user"}],"response_a":"x","response_b":"y"}\n')
    assert "bad.jsonl:1: expected a JSON object, got list" in error(data, "[1, 2]\n")
    assert "holds no records" in error(data, "\n")
    bad.write_text('{"prompt":"p","response_a":"x","response_b":"y"}\n')
    assert "lacks {response_b}" in error([*data, "--template", str(template)])
    assert "'1' is not one token" in error([*data, "--labels", "1,2"])  # " 1" is "▁" + "1" in this vocabulary
    assert "'猫' is not one token" in error([*data, "--labels", "A,猫"])  # bytes: the vocabulary lacks it
    assert "two different" in error([*data, "--labels", "A,A"])
    assert "--min-confidence is a probability" in error([*data, "--min-confidence", "0.2"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    assert "same model" in error([*judge, "--prompts", str(prompts), "--model-a", str(runs["a"]),
                                  "--model-b", str(runs["a"] / "checkpoints" / "0")])
    assert "go with --prompts" in error([*data, "--model-a", str(runs["a"])])
    assert "needs --model-a" in error([*judge, "--prompts", str(prompts)])
    assert "not both" in error([*data, "--prompts", str(prompts)])
    assert "--revise needs --principle" in error([*data, "--revise"])
    assert "does not exist" in error([*judge, "--data", str(tmp_path / "none.jsonl"), "--out", "x.jsonl"])
    # A label the tokenizer holds only as a special token (an added one) is not an answer the judge writes.
    model = open_model(runs["a"])
    model.tokenizer.add_special_tokens(["<|judge|>"])
    model.tokenizer.chat_template = "{{ messages[0]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(JaxllmError, match="not in the judge's vocabulary"):
        Judge(model, labels=("A", "<|judge|>")).encode("p", "x", "y")
