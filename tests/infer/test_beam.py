"""Beam search against transformers' `generate(num_beams=N, do_sample=False)` on the same tiny random
models (a Llama decoder, a T5 and a BART encoder-decoder, built as tests/convert/test_parity.py builds
them): equal tokens for prompts of different lengths decoded as one left-padded batch, and scores
(sequences_scores) within 1e-4, over length penalties, early stopping settings, n-best lists and the
penalties that act on beams."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxllm import from_hf
from jaxllm.config import GenerateConfig
from jaxllm.infer.generate import generate_scored
from tests.convert.test_parity import CASES, Case, _hf_model, _llama

LLAMA = Case("llama-beam", transformers.LlamaForCausalLM, _llama(max_position_embeddings=128), "decoder", 97)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
NEW = 9
PAD = 0


def _model(case, tmp_path, sharpen):
    torch.manual_seed(0)  # the same random model whichever tests ran before
    hf_model = _hf_model(case, tmp_path)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.mul_(sharpen)  # distributions sharp enough that beams are not near ties
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    return hf_model, from_hf(tmp_path, devices=jax.devices()[:1])  # one device: small and quick


def _stop_ids(hf_model, kind, start, use_cache):
    """Two tokens greedy decoding writes early (the 4th of the first prompt, the 3rd of the last), declared
    stop ids, so that hypotheses end at different steps."""
    stops = []
    for prompt, at in ((PROMPTS[0], 3), (PROMPTS[-1], 2)):
        with torch.no_grad():
            kw = dict(decoder_start_token_id=start) if kind == "encoder_decoder" else {}
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, num_beams=1,
                                    eos_token_id=None, pad_token_id=PAD, use_cache=use_cache, **kw,
                                    **_PLAIN)
        stops.append(out[0, (1 if kind == "encoder_decoder" else len(prompt)) + at].item())
    return stops


# transformers' config defaults that would add processors (BART's forced EOS, ...): all off.
_PLAIN = dict(forced_bos_token_id=None, forced_eos_token_id=None, min_length=0, no_repeat_ngram_size=0)


def _theirs(hf_model, kind, prompt, eos, start, use_cache, **options):
    kw = dict(decoder_start_token_id=start) if kind == "encoder_decoder" else {}
    plain = {**_PLAIN, **{k: v for k, v in options.items() if k in _PLAIN}}
    options = {k: v for k, v in options.items() if k not in _PLAIN}
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                                pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                                use_cache=use_cache, **kw, **plain, **options)
    skip = 1 if kind == "encoder_decoder" else len(prompt)
    rows = []
    for row in out.sequences[:, skip:].tolist():
        rows.append(row[: min([row.index(i) for i in eos if i in row], default=len(row))])
    return rows, out.sequences_scores.tolist()


def _check(case, hf_model, loaded, start, settings, use_cache=True):
    eos = _stop_ids(hf_model, case.kind, start, use_cache)
    ended = 0
    for options in settings:
        gen = GenerateConfig(max_new_tokens=NEW, temperature=0.0, **options)
        ours, scores = generate_scored(loaded.graphdef, loaded.params, loaded.config, PROMPTS, gen, eos, PAD, start)
        n = gen.num_return_sequences
        for i, prompt in enumerate(PROMPTS):
            rows, theirs = _theirs(hf_model, case.kind, prompt, eos, start, use_cache, **options)
            assert ours[i * n:(i + 1) * n] == rows, (case.name, options, i)
            np.testing.assert_allclose(scores[i * n:(i + 1) * n], theirs, atol=1e-4, err_msg=str(options))
            ended += sum(len(r) < NEW for r in rows)
    assert ended > 0, "no hypothesis ended at a stop id: the case does not test finished beams"


def test_decoder_beam_search_matches_transformers(tmp_path):
    hf_model, loaded = _model(LLAMA, tmp_path, 4.0)
    _check(LLAMA, hf_model, loaded, None, [
        dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
        dict(num_beams=3, length_penalty=-0.5, early_stopping=True, num_return_sequences=2,
             repetition_penalty=1.3, no_repeat_ngram_size=2),
    ])


@pytest.mark.parametrize("name, start, options", [
    ("t5-v1.1-gated-untied", 0, dict(num_beams=2, length_penalty=0.5, early_stopping=True, min_new_tokens=3,
                                     num_return_sequences=2)),
    ("bart", 2, dict(num_beams=3, num_return_sequences=2)),  # transformers' defaults otherwise
])
def test_encoder_decoder_beam_search_matches_transformers(name, start, options, tmp_path):
    case = next(c for c in CASES if c.name == name)
    hf_model, loaded = _model(case, tmp_path, 4.0)
    # transformers' own cache mis-sizes decoders deeper than encoders (T5 here): it runs without one.
    _check(case, hf_model, loaded, start, [options], use_cache=False)
