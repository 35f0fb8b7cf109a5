"""Decoding options: the logits processors against transformers' on random logits, greedy decoding with
them against transformers' generate on a tiny converted Llama, n samples per prompt, stop strings, the
checks of bad combinations, and the encoder-decoder's cached cross-attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import transformers.generation.logits_process as hf
from flax import nnx

from jaxllm import from_hf, models
from jaxllm.cli import main
from jaxllm.config import ConfigError, GenerateConfig
from jaxllm.infer.generate import cut_at_stop, generate
from jaxllm.infer.sampling import no_repeat_ngram, repetition_penalty, suppress_stops
from tests.conftest import tiny_model_config
from tests.convert.test_parity import CASES, Case, _hf_model, _llama

RNG = np.random.default_rng(0)
V = 40


def _left_padded(ids_BL, lengths):
    """Rows of ids_BL cut to their last `lengths` tokens and left-padded to the full width (pad = 0)."""
    valid = np.arange(ids_BL.shape[1])[None] >= ids_BL.shape[1] - np.asarray(lengths)[:, None]
    return np.where(valid, ids_BL, 0), valid


@pytest.mark.parametrize("n", [1, 2, 3])
def test_processors_match_transformers_on_random_logits(n):
    """Each row compared with transformers' processor on the row's real tokens alone: padding (left, as
    generate lays prompts out) is not a token of the text."""
    ids = RNG.integers(0, 6, (4, 14))  # few distinct ids: n-grams repeat
    logits = RNG.normal(size=(4, V)).astype(np.float32) * 3
    lengths = [14, 9, 3, 1]
    padded, valid = _left_padded(ids, lengths)
    ours_rep = np.asarray(repetition_penalty(jnp.asarray(logits), padded, valid, 1.7))
    ours_ngram = np.asarray(no_repeat_ngram(jnp.asarray(logits), padded, valid, 14, n))
    for b, length in enumerate(lengths):
        row_ids, row_logits = torch.tensor(ids[b:b + 1, 14 - length:]), torch.tensor(logits[b:b + 1])
        theirs = hf.RepetitionPenaltyLogitsProcessor(1.7)(row_ids, row_logits.clone()).numpy()
        np.testing.assert_allclose(ours_rep[b:b + 1], theirs, rtol=1e-6)
        theirs = hf.NoRepeatNGramLogitsProcessor(n)(row_ids, row_logits.clone()).numpy()
        np.testing.assert_array_equal(ours_ngram[b:b + 1], theirs)
    assert np.isinf(ours_ngram).any()  # the case bans something
    for t in (2, 3):
        theirs = hf.MinNewTokensLengthLogitsProcessor(10, 3, torch.tensor([5, 7]))(
            torch.tensor(ids[:, :10 + t]), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(suppress_stops(jnp.asarray(logits), jnp.asarray([5, 7]), t < 3)),
                                      theirs)


LLAMA = Case("llama-decoding", transformers.LlamaForCausalLM, _llama(max_position_embeddings=128), "decoder", 97)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf_model = _hf_model(LLAMA, directory)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.mul_(4.0)
    hf_model.save_pretrained(directory, safe_serialization=True)
    return hf_model, from_hf(directory, devices=jax.devices()[:1])


def test_greedy_with_penalties_matches_transformers(llama):
    """Prompts of different lengths in one left-padded batch; transformers decodes each alone."""
    hf_model, loaded = llama
    prompts, new, eos = [[5, 6, 7, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]], 12, 3
    for options in (dict(repetition_penalty=1.6, min_new_tokens=4), dict(no_repeat_ngram_size=1)):
        ours = generate(loaded.graphdef, loaded.params, loaded.config, prompts,
                        GenerateConfig(max_new_tokens=new, temperature=0.0, **options), eos, 0)
        changed = False
        for prompt, got in zip(prompts, ours):
            with torch.no_grad():
                kw = dict(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)
                theirs = hf_model.generate(torch.tensor([prompt]), **kw, **options)[0, len(prompt):].tolist()
                plain = hf_model.generate(torch.tensor([prompt]), **kw)[0, len(prompt):].tolist()
            assert got == (theirs[: theirs.index(eos)] if eos in theirs else theirs), options
            changed |= theirs != plain
        assert changed, f"{options} change no output: the case tests nothing"


def test_num_return_sequences_samples_each_prompt_n_times():
    cfg = tiny_model_config(init_std=0.3)
    graphdef, state = nnx.split(models.create_model(cfg, seed=1), nnx.Param)
    params = nnx.to_pure_dict(state)
    gen = GenerateConfig(max_new_tokens=8, temperature=1.0, num_return_sequences=3, seed=3)
    out = generate(graphdef, params, cfg, [[1, 2, 3], [4]], gen, None, 0)
    assert len(out) == 6 and len({tuple(r) for r in out[:3]}) > 1  # three different samples of prompt 0
    assert out == generate(graphdef, params, cfg, [[1, 2, 3], [4]], gen, None, 0)  # seeded


def test_stop_strings_cut_the_text_before_the_first_stop():
    assert cut_at_stop("Hello world. Next: more\n\nQ:", ["\n\n", "Next"]) == "Hello world. "
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"
    assert cut_at_stop("ends###", ["###", "s#"]) == "end"


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=3), "beam search (num_beams=3) is deterministic and does not sample: set temperature 0"),
    (dict(num_beams=2, temperature=0.0, num_return_sequences=3), "num_return_sequences=3 exceeds num_beams=2"),
    (dict(num_return_sequences=2, temperature=0.0), "greedy sequences would all be the same"),
    (dict(length_penalty=2.0), "length_penalty and early_stopping belong to beam search"),
    (dict(num_beams=2, temperature=0.0, early_stopping="sometimes"), "early_stopping must be true, false or never"),
    (dict(repetition_penalty=0.0), "generate.repetition_penalty must be > 0"),
    (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens=9 exceeds max_new_tokens=8"),
    (dict(no_repeat_ngram_size=-1), "generate.no_repeat_ngram_size must be >= 0"),
    (dict(stop=[""]), "generate.stop must be a list of non-empty strings"),
])
def test_bad_decoding_options_are_one_line_errors(options, message):
    cfg = tiny_model_config()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(None, None, cfg, [[1]], GenerateConfig(**options), None, 0)


def test_generate_command_takes_the_decoding_flags(capsys):
    """The flags reach GenerateConfig and are checked before any model is read."""
    code = main(["generate", "--run-dir", "/no/such/run", "--prompt", "x", "--num-beams", "4",
                 "--num-return-sequences", "5", "--temperature", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "num_return_sequences=5 exceeds num_beams=4" in err[0], err
    code = main(["generate", "--run-dir", "/no/such/run", "--prompt", "x", "--num-beams", "4", "--temperature", "0",
                 "--early-stopping", "never", "--length-penalty", "0.5", "--repetition-penalty", "1.2",
                 "--no-repeat-ngram-size", "3", "--min-new-tokens", "2", "--stop", "\n\n", "--stop", "###"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "does not exist" in err[0], err  # the options passed; the model was looked for


def test_encoder_decoder_caches_cross_attention_keys_and_values(tmp_path):
    """The prefill puts the memory's keys/values in the cache; later steps read them there, so they no
    longer need the memory itself (a zeroed one gives the same logits), and match full decoding."""
    case = next(c for c in CASES if c.name == "bart")
    _hf_model(case, tmp_path)
    loaded = from_hf(tmp_path, devices=jax.devices()[:1])
    enc = jnp.asarray([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    dec = jnp.asarray([[2, 30, 31, 32], [2, 40, 41, 42]])

    @jax.jit
    def run(params):
        model = models.bind(loaded.graphdef, params)
        memory = model.encode(enc, None, (enc > 0).astype(jnp.int32))
        full = model.decode(memory, dec)[0]
        cache = models.init_cache(loaded.config, 2, 4)
        assert cache.cross_k is None
        first, cache = model.decode(memory, dec[:, :1], jnp.zeros((2, 1), jnp.int32), None, cache)
        zeroed, steps = memory._replace(x_BSD=jnp.zeros_like(memory.x_BSD)), [first]
        for t in range(1, 4):
            logits, cache = model.decode(zeroed, dec[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), None, cache)
            steps.append(logits)
        return full, jnp.concatenate(steps, axis=1), cache.cross_k

    full, stepped, cross_k = run(loaded.params)
    assert cross_k.shape[2] == 5  # [layers, B, S_enc, K, H]
    np.testing.assert_allclose(stepped, full, atol=2e-5)
