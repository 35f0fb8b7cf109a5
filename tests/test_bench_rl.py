"""`jaxllm bench CONFIG --peer trl` for an online RL config (jaxllm/bench_rl.py): a jaxllm GRPO cycle (rollout +
update) next to TRL's GRPOTrainer on the same prompt ids, group size and batch, every completion exactly
rl.max_new_tokens long on both sides. Speed itself is never asserted."""

import json

import pytest

from jaxllm.bench_rl import JAXLLM_ROW, TRL_ROW, as_words, token_share, word_tokenizer
from jaxllm.cli import main

MICRO = [
    "model.family=llama", "model.vocab_size=4096", "model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32", "data.shuffle_window=0", "train.batch_size=8",
    "train.init_from=null", "rl.num_generations=4", "rl.max_new_tokens=6",
]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"And God said {'let there be ' * (i % 3)}{i}"}) + "\n"
                            for i in range(32)))
    return str(path)


@pytest.mark.slow  # about 30 s of CPU: TRL's and jaxllm's trainers are built and compiled, two cycles each
def test_grpo_cycle_against_trl_on_the_same_prompts_and_completion_lengths(prompts, tmp_path, capsys):
    out = tmp_path / "rl.json"
    code = main(["bench", "configs/tiny-grpo.yaml", *MICRO, f"data.sources=[{{path: {prompts}}}]", "--peer", "trl",
                 "--steps", "1", "--warmup", "1", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    ours, trl = results[JAXLLM_ROW], results[TRL_ROW]
    # TRL tokenized the words [ID] to the ids jaxllm's rollouts sampled from, each prompt num_generations times
    assert ours["same_prompts"] is True and trl["same_prompts"] is True
    assert ours["completion_lengths"] == trl["completion_lengths"] == [6]  # no early stop on either side
    for row in (ours, trl):
        assert row["completions_per_cycle"] == 8 and row["updates_per_cycle"] == 1 and row["cycles"] == 1
        assert 0 < row["rollout_share"] <= row["prepare_share"] < 1
        assert row["samples_per_sec"] * 6 == pytest.approx(row["tokens_per_sec"])
    assert trl["compare_to"] == JAXLLM_ROW
    assert trl["samples_per_sec_ratio"] == pytest.approx(ours["samples_per_sec"] / trl["samples_per_sec"])
    printed = capsys.readouterr().out
    assert f"{JAXLLM_ROW}: " in printed and "samples/s" in printed and "jaxllm is x faster" in printed


def test_an_online_objective_without_a_trl_peer_is_a_one_line_error(prompts, capsys):
    code = main(["bench", "configs/tiny-grpo.yaml", *MICRO, f"data.sources=[{{path: {prompts}}}]",
                 "data.objective.name=rloo", "--peer", "trl"])
    assert code == 2 and "has no TRL peer" in capsys.readouterr().err


def test_the_reward_is_the_share_of_even_ids():
    assert token_share(["p", "q"], ["a", "b"], completion_ids=[[2, 3, 4, 5], [1]]) == [0.5, 0.0]


def test_trls_prompts_tokenize_back_to_jaxllms_ids():
    ids = [4037, 128, 1, 0, 10, 11, 2, 4095]  # ids whose digits start with the pad and eos ids' (0, 1)
    assert word_tokenizer(4096)(as_words(ids))["input_ids"] == ids
