import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import models
from jaxllm.config import GenerateConfig, JaxllmError
from jaxllm.infer.generate import generate, left_pad
from jaxllm.infer.sampling import sample_logits
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_model_config(init_std=0.3, sliding_window=6)
    model = models.create_model(cfg, seed=1)
    graphdef, state = nnx.split(model, nnx.Param)
    return cfg, model, graphdef, nnx.to_pure_dict(state)


def _greedy_by_full_rerun(model, prompt, n, width=32):
    """Greedy decoding without a cache: the whole sequence is re-run for every new token. Right
    padding to a fixed width (harmless under the causal mask) keeps it to one compilation."""
    forward = nnx.jit(lambda m, t: m(t)[0])
    seq = list(prompt)
    for _ in range(n):
        logits = forward(model, jnp.asarray([seq + [0] * (width - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_kv_cache_decoding_equals_full_rerun(model_and_params):
    """Batch of prompts of different lengths (left padding) with a sliding window shorter than the
    generated text: cached decoding must pick the same greedy tokens as re-running the whole sequence."""
    cfg, model, graphdef, params = model_and_params
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42]]
    out = generate(graphdef, params, cfg, prompts, GenerateConfig(max_new_tokens=12, temperature=0.0), None, 0)
    for prompt, got in zip(prompts, out):
        assert got == _greedy_by_full_rerun(model, prompt, 12)


def test_generation_stops_at_eos(model_and_params):
    cfg, model, graphdef, params = model_and_params
    prompt = [5, 6, 7]
    free = generate(graphdef, params, cfg, [prompt], GenerateConfig(max_new_tokens=8, temperature=0.0), None, 0)[0]
    eos = free[3]  # declare the 4th generated token to be EOS
    stopped = generate(graphdef, params, cfg, [prompt], GenerateConfig(max_new_tokens=8, temperature=0.0), eos, 0)[0]
    assert stopped == free[: free.index(eos)]


def test_generation_stops_at_any_of_several_stop_ids(model_and_params):
    """A chat reply ends at EOS or at an end-of-turn token: whichever the row emits first."""
    cfg, model, graphdef, params = model_and_params
    greedy = GenerateConfig(max_new_tokens=8, temperature=0.0)
    free = generate(graphdef, params, cfg, [[5, 6, 7]], greedy, None, 0)[0]
    later, sooner = free[5], free[2]
    assert later not in free[:5] and sooner not in free[:2]
    assert generate(graphdef, params, cfg, [[5, 6, 7]], greedy, [later, sooner], 0)[0] == free[:2]
    assert generate(graphdef, params, cfg, [[5, 6, 7]], greedy, [later], 0)[0] == free[:5]


def test_sampling_is_seeded_and_varies(model_and_params):
    cfg, _, graphdef, params = model_and_params
    gen = GenerateConfig(max_new_tokens=10, temperature=1.0, seed=7)
    a = generate(graphdef, params, cfg, [[1, 2]], gen, None, 0)
    b = generate(graphdef, params, cfg, [[1, 2]], gen, None, 0)
    c = generate(graphdef, params, cfg, [[1, 2]], GenerateConfig(max_new_tokens=10, temperature=1.0, seed=8), None, 0)
    assert a == b and a != c


def test_prompt_longer_than_context_is_a_clear_error(model_and_params):
    cfg, _, graphdef, params = model_and_params
    with pytest.raises(JaxllmError, match="exceeds the model's context of 64"):
        generate(graphdef, params, cfg, [[1] * 60], GenerateConfig(max_new_tokens=10), None, 0)


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(JaxllmError):
        left_pad([[]], 0)


def _frequencies(logits, n=4000, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: sample_logits(logits[None], k, **kw)[0])(keys)
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_sampling_filters():
    probs = jnp.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(probs)
    assert int(sample_logits(logits[None], jax.random.key(0), 0.0, 0, 1.0)[0]) == 0  # greedy
    top2 = _frequencies(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert top2[2] == top2[3] == 0
    np.testing.assert_allclose(top2[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    nucleus = _frequencies(logits, temperature=1.0, top_k=0, top_p=0.75)  # 0.5 + 0.3 reach 0.75
    assert nucleus[2] == nucleus[3] == 0 and nucleus[1] > 0.3
    tiny_p = _frequencies(logits, temperature=1.0, top_k=0, top_p=0.01)  # the top token is always kept
    assert tiny_p[0] == 1.0
    plain = _frequencies(logits, temperature=1.0, top_k=0, top_p=1.0)
    np.testing.assert_allclose(plain, probs, atol=0.03)
    hot = _frequencies(logits, temperature=5.0, top_k=0, top_p=1.0)
    assert hot[3] > plain[3] + 0.1  # higher temperature flattens the distribution


def test_chat_prompts_are_tokenized_as_training_tokenizes_conversations(monkeypatch):
    """`generate_text(chat=True)` reads a template's `</s>` as EOS's id (as jaxllm.data.chat and transformers'
    apply_chat_template do), not as the characters a document's "</s>" would be."""
    from jaxllm.config import Config
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.infer import generate as gen_module

    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    seen = []
    monkeypatch.setattr(gen_module, "generate", lambda graphdef, params, model_cfg, prompts, *a: seen.extend(prompts)
                        or [[] for _ in prompts])
    gen_module.generate_text(None, None, Config(), tokenizer, ["Who begat Enos?"], GenerateConfig(), chat=True)
    assert seen == [tokenizer.encode_rendered("<|user|>\nWho begat Enos?</s>\n<|assistant|>\n")]
    assert seen[0].count(tokenizer.eos_id) == 1
