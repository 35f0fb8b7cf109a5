"""Perplexity with sliding windows: the Hugging Face recipe computed in torch on the same converted model, a
short document's mean token NLL, context lowering perplexity on a trained model, lm-evaluation-harness's word
and byte counts, and one-line errors for bad input."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from jaxllm import models, sharding
from jaxllm.cli import main
from jaxllm.config import DataConfig, JaxllmError, MeshConfig, ModelConfig, SourceConfig
from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
from jaxllm.data.tokenizer import HFTokenizer, load_tokenizer
from jaxllm.eval.perplexity import Scorer, count_bytes, count_words, load_scorer, perplexity, windows
from tests.conftest import random_params

CONTEXT = 64
GENESIS = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers, with the kjv-sp4k tokenizer (BOS first) as tokenizer.json."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                           tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
    model = T.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(path)
    for name, blob in hf_tokenizer_files(load_tokenizer("builtin:kjv-sp4k"), DataConfig(add_eos=False)).items():
        (path / name).write_bytes(blob)
    return path, model


@pytest.fixture(scope="module")
def scorer(hf_dir):
    return load_scorer(hf_dir[0])


def _recipe_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of https://huggingface.co/docs/transformers/perplexity in torch, each window's labels the
    tokens after its positions (the recipe's own labels lose a window's first token to the shift)."""
    ids_t = torch.tensor([ids])
    seq_len = len(ids) - 1  # input positions that have a next token
    nll, count, prev_end = 0.0, 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: torch's threads only wait on each other (50x slower on a busy CPU)
    try:
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            labels = ids_t[:, begin + 1: end + 1].clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                logits = model(ids_t[:, begin:end]).logits.double()
            nll += torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum").item()
            count += trg_len
            prev_end = end
            if end == seq_len:
                break
    finally:
        torch.set_num_threads(threads)
    return nll, count


@pytest.mark.parametrize("stride", [CONTEXT, 24])
def test_equals_the_hugging_face_recipe_in_torch(hf_dir, scorer, stride):
    path, model = hf_dir
    max_length = CONTEXT  # the same compiled shapes for both strides
    texts = _documents("builtin:kjv-valid", 2)
    hf_tokenizer = T.AutoTokenizer.from_pretrained(path)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = hf_tokenizer(text).input_ids
        assert ids[0] == hf_tokenizer.bos_token_id == scorer.bos_id  # the HF tokenizer frames with BOS; so do we
        doc_nll, doc_tokens = _recipe_nll(model, ids, max_length, stride)
        nll, tokens = nll + doc_nll, tokens + doc_tokens
    result = perplexity(scorer, [SourceConfig(path="builtin:kjv-valid")], max_length, stride, batch_size=4, limit=2)
    ours = result["sources"]["builtin:kjv-valid"]
    assert ours["tokens"] == tokens > 2 * max_length  # several windows per document
    assert ours["nll"] == pytest.approx(nll, rel=1e-4)
    assert ours["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert ours["words"] == sum(len(t.split()) for t in texts)  # kjv chapters: no leading/trailing whitespace
    assert ours["bits_per_byte"] == pytest.approx(nll / sum(len(t.encode()) for t in texts) / math.log(2), rel=1e-4)


def test_a_jaxllm_run_scores_as_the_hugging_face_directory_it_was_converted_from(hf_dir, scorer, tmp_path):
    from jaxllm.convert.hf import hf_to_jaxllm

    run = hf_to_jaxllm(hf_dir[0], tmp_path / "run")
    source = [SourceConfig(path="builtin:kjv-valid")]
    ours, theirs = (perplexity(s, source, 32, batch_size=4, limit=1) for s in (load_scorer(run), scorer))
    assert ours["bos"] and ours["model"].startswith(str(run))  # BOS from the run's data.add_bos
    assert ours["sources"]["builtin:kjv-valid"] == pytest.approx(theirs["sources"]["builtin:kjv-valid"], rel=1e-6)


def test_a_short_document_at_stride_max_length_is_its_mean_token_nll(scorer, tmp_path):
    source = tmp_path / "genesis.txt"
    source.write_text(GENESIS)
    result = perplexity(scorer, [SourceConfig(path=str(source), text_unit="file")])
    ours = result["sources"][str(source)]
    ids = [scorer.bos_id] + scorer.tokenizer.encode(GENESIS)
    assert result["max_length"] == result["stride"] == CONTEXT > len(ids)
    forward = jax.jit(lambda params, tokens: models.bind(scorer.graphdef, params)(tokens)[0])
    logits = forward(scorer.params, np.asarray([ids[:-1]]))
    logp = torch.log_softmax(torch.from_numpy(np.asarray(logits[0], np.float64)), dim=-1).numpy()
    mean_nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert ours["tokens"] == len(ids) - 1 and ours["documents"] == 1
    assert ours["nll_per_token"] == pytest.approx(mean_nll, rel=1e-5)
    assert ours["token_perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)


@pytest.fixture(scope="module")
def char_model():
    """A one-layer character-level decoder trained for 120 steps on 20 chapters of the King James Bible:
    enough to use a few characters of context (inside words), which a window's first positions lack."""
    import optax

    from jaxllm.train.losses import cross_entropy

    docs = _documents("builtin:kjv", 20)
    chars = sorted(set("".join(docs + _documents("builtin:kjv-valid", 1))))
    vocab = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = HFTokenizer({"tokenizer.json": RustTokenizer(BPE(vocab, [], unk_token="<unk>")).to_str().encode(),
                             "tokenizer_config.json": json.dumps({"bos_token": "<s>"}).encode()})
    ids = np.asarray(tokenizer.encode("\n".join(docs)), np.int32)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      max_seq_len=CONTEXT, tie_embeddings=True)
    graphdef = models.model_spec(cfg)[0]
    params = random_params(cfg, std=0.05)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, batch_BL):
        def loss(p):
            logits_BLV, _ = models.bind(graphdef, p)(batch_BL[:, :-1])
            return cross_entropy(logits_BLV, batch_BL[:, 1:], jnp.ones(batch_BL[:, 1:].shape))[0] / batch_BL[:, 1:].size

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng, opt_state = np.random.default_rng(0), optimizer.init(params)
    for _ in range(120):
        batch = np.stack([ids[s: s + 33] for s in rng.integers(0, len(ids) - 33, 16)])
        params, opt_state = step(params, opt_state, batch)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    return Scorer(graphdef, params, cfg, tokenizer, tokenizer.bos_id, mesh, sharding.make_rules())


def test_a_smaller_stride_lowers_the_perplexity_of_a_trained_model(char_model):
    source = SourceConfig(path="builtin:kjv-valid")
    full, overlapping = (perplexity(char_model, [source], 16, stride, batch_size=64, limit=1)["sources"][source.path]
                         for stride in (16, 4))
    assert full["tokens"] == overlapping["tokens"] > 1000  # the same tokens, each with more context
    assert overlapping["token_perplexity"] < 0.99 * full["token_perplexity"]  # measured: 10.24 vs 10.56


def _documents(path, n):
    from jaxllm.data.sources import make_source

    iterator = iter(make_source(SourceConfig(path=path), num_epochs=1))
    return [next(iterator)["text"] for _ in range(n)]


def test_windows_score_every_token_once_with_context():
    for length, max_length, stride in [(2, 4, 4), (10, 4, 4), (10, 4, 1), (33, 8, 3), (100, 16, 16), (9, 8, 5)]:
        found = windows(length, max_length, stride)
        scored = [p for start, stop, n in found for p in range(stop - n + 1, stop + 1)]  # target indices
        assert scored == list(range(1, length))
        for start, stop, n in found:
            assert 0 <= start < stop <= start + max_length and 1 <= n <= stop - start
            assert stop - n + 1 - start >= min(max_length - stride + 1, stop - n + 1)  # context of the first
    assert windows(1, 4, 4) == []


def test_words_and_bytes_are_lm_evaluation_harness_counts():
    text = "Grüße aus Köln — 東京は晴れ\u3000です\xa0🙂\n\tπ≈3.14"
    # Whitespace runs split words (Unicode spaces too, as Python's re does); a whole CJK phrase is one word.
    assert count_words(text) == 8  # Grüße aus Köln — 東京は晴れ です 🙂 π≈3.14
    assert count_bytes(text) == 7 + 1 + 3 + 1 + 5 + 1 + 3 + 1 + 15 + 3 + 6 + 2 + 4 + 2 + 2 + 3 + 4 == 63
    assert count_words(" leading and trailing ") == 5  # lm-eval's re.split keeps the empty ends
    lm_eval_task = pytest.importorskip("lm_eval.api.task")
    assert count_words(text) == lm_eval_task.ConfigurableTask.count_words(text)
    assert count_bytes(text) == lm_eval_task.ConfigurableTask.count_bytes(text)


def test_word_and_byte_counts_of_a_multilingual_source(scorer, tmp_path):
    texts = ["Grüße aus Köln — 東京は晴れ\u3000です", "Ἐν ἀρχῇ ἦν ὁ λόγος, in principio erat Verbum 🙂"]
    source = tmp_path / "multi.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    result = perplexity(scorer, [SourceConfig(path=str(source), text_field="body")], 16, 8)
    ours = result["sources"][str(source)]
    assert (ours["documents"], ours["words"], ours["bytes"]) == (2, 6 + 10, 46 + 68)
    assert ours["tokens"] == sum(len(scorer.tokenizer.encode(t)) for t in texts)  # BOS first, every token scored
    assert ours["byte_perplexity"] == pytest.approx(math.exp(ours["nll"] / 114))
    assert ours["bits_per_byte"] == pytest.approx(ours["nll"] / 114 / math.log(2))
    assert ours["word_perplexity"] == pytest.approx(math.exp(ours["nll"] / 16))


def test_bad_input_is_a_one_line_error(hf_dir, scorer, tmp_path, capsys):
    source = SourceConfig(path="builtin:kjv-valid")
    with pytest.raises(JaxllmError, match="--stride 65 must be between 1 and --max-length 64"):
        perplexity(scorer, [source], stride=CONTEXT + 1)
    with pytest.raises(JaxllmError, match="--max-length 128 must be between 1 and the model's context of 64"):
        perplexity(scorer, [source], max_length=128)
    with pytest.raises(JaxllmError, match="--max-length 0 must be between 1 and"):
        perplexity(scorer, [source], max_length=0)
    with pytest.raises(JaxllmError, match="--batch-size must be >= 1, got 0"):
        perplexity(scorer, [source], batch_size=0)
    with pytest.raises(JaxllmError, match=r"--limit must be >= 1 \(documents per source\), got 0"):
        perplexity(scorer, [source], limit=0)
    with pytest.raises(JaxllmError, match="--data names a source twice: builtin:kjv-valid"):
        perplexity(scorer, [source, source])
    one_token = tmp_path / "one-token.txt"  # "the" is one kjv-sp4k token: without BOS nothing predicts it
    one_token.write_text("the")
    with pytest.raises(JaxllmError, match="no document is longer than one token and the tokenizer adds no BOS"):
        perplexity(dataclasses.replace(scorer, bos_id=None), [SourceConfig(path=str(one_token), text_unit="file")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(JaxllmError, match=f"data source {empty} yielded no documents"):
        perplexity(scorer, [SourceConfig(path=str(empty))])
    cases = [
        (["--data", "builtin:kjv-valid", "--max-length", "16", "--stride", "32"], "--stride 32 must be between 1"),
        (["--data", str(empty)], "yielded no documents in a whole pass"),
        (["--data", "builtin:kjv-valid", "--max-length", "65"], "the model's context of 64 tokens"),
        (["--data", "builtin:kjv-valid", "--stride", "0"], "--stride must be >= 1, got 0"),
        (["--data", str(tmp_path / "missing.txt")], "matches no files"),
    ]
    bare = tmp_path / "no-tokenizer"  # the model's weights without its tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir[0] / name).read_bytes())
    bert = tmp_path / "bert"
    T.BertForMaskedLM(T.BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=32)).save_pretrained(bert)
    capsys.readouterr()  # transformers' progress bar
    wide = tmp_path / "wide-tokenizer.json"  # more ids than the model's 4096
    RustTokenizer(BPE({f"t{i}": i for i in range(5000)}, [], unk_token="t0")).save(str(wide))
    cases = [(hf_dir[0], argv, message) for argv, message in cases] + [
        (bare, ["--data", "builtin:kjv-valid"], "carries no tokenizer; pass --tokenizer PATH"),
        (bert, ["--data", "builtin:kjv-valid"], "is an encoder model; perplexity scores decoder-only"),
        (tmp_path / "nothing", ["--data", "builtin:kjv-valid"], "does not exist; give a jaxllm run directory"),
        (hf_dir[0], ["--data", "builtin:kjv-valid", "--tokenizer", str(wide)],
         "has 5000 tokens but the model only 4096"),
    ]
    for model, argv, message in cases:
        assert main(["perplexity", str(model), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), err


def test_cli_writes_json(hf_dir, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    argv = ["perplexity", str(hf_dir[0]), "--data", "builtin:kjv-valid", "--data", "builtin:kjv-ot-valid",
            "--limit", "1", "--max-length", "32", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["sources"]) == {"builtin:kjv-valid", "builtin:kjv-ot-valid"} and result["stride"] == 32
    both = result["all"]
    assert both["tokens"] == sum(r["tokens"] for r in result["sources"].values())
    assert both["nll"] == pytest.approx(sum(r["nll"] for r in result["sources"].values()))
    assert "builtin:kjv-ot-valid: 1 documents" in capsys.readouterr().out
