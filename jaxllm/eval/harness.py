"""lm-evaluation-harness with a jaxllm model as its backend: `JaxLM`, an `lm_eval.api.model.TemplateLM`.

Tokenization follows the harness's Hugging Face backend (HFLM), so per-request log-likelihoods match it:
contexts get BOS when the model's tokenizer adds one (a Hugging Face tokenizer.json whose post-processor
prepends it; a jaxllm run trained with data.add_bos), a context + continuation pair is encoded whole and
split at the context's length, and an empty context is the prefix token (BOS, else EOS).

Fast on a mesh: requests sharing their scored input (multiple choice with one-token answers: the same
context, different last tokens) run as one row whose last position scores every candidate; rows are sorted
longest first, batched `batch_size` at a time (rounded to the data-parallel size) and padded to a few
widths (powers of two, up to the model's context), so a task compiles a handful of programs; the batch is
sharded over the mesh's data-parallel axes. With several processes each scores its own share of the
requests (lm_eval's rank / world_size) and the processes agree on every batch's shape first; generation
runs every process's prompts in the same batches (the sampler takes replicated prompts, as `jaxllm generate`
runs on several hosts) and each keeps its own. lm_eval gathers the per-sample results on process 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from jaxllm import models, sharding
from jaxllm.config import GenerateConfig, JaxllmError, MeshConfig, ModelConfig
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.infer.generate import generate
from jaxllm.train.losses import chunked_sums

log = logging.getLogger("jaxllm")
MIN_WIDTH = 16  # the narrowest padded row: shorter buckets would only add compilations
LOGITS_CHUNK = 512  # positions whose [B, chunk, V] logits exist at once while scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def score_rows(params, inputs_BL, segment_ids_BL, last_B, candidates_BK, *, graphdef, chunk):
    """Log-probabilities of right-padded rows: for every position its next input token's log-prob and whether
    it is the most likely token (logp_BL, greedy_BL; the last real position's are meaningless), and at each
    row's last real position `last_B` the log-prob of each candidate token (cand_logp_BK) and the most likely
    token (argmax_B). Padding has segment id 0."""
    model = models.bind(graphdef, params)
    B, L = inputs_BL.shape
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    x_BLD, _, _ = model.hidden(inputs_BL, positions_BL, segment_ids_BL)
    targets_BL = jnp.pad(inputs_BL[:, 1:], ((0, 0), (0, 1)))

    def piece(x_BCD, t_BC):
        logits_BCV = model.logits(x_BCD).astype(jnp.float32)
        target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        logp_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
        return (), (logp_BC, jnp.argmax(logits_BCV, axis=-1) == t_BC)

    _, (logp_BL, greedy_BL) = chunked_sums(piece, (x_BLD, targets_BL), chunk, per_position=True)
    x_B1D = jnp.take_along_axis(x_BLD, last_B[:, None, None], axis=1)
    logits_BV = model.logits(x_B1D)[:, 0].astype(jnp.float32)
    cand_logp_BK = jnp.take_along_axis(logits_BV, candidates_BK, axis=1) - jax.nn.logsumexp(logits_BV, -1)[:, None]
    return logp_BL, greedy_BL, cand_logp_BK, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class _Row:
    """One scored input (inputs = context + continuation[:-1], cut to the model's context) and the distinct
    last tokens (candidates) of the requests that share it."""

    inputs: list[int]
    candidates: list[int]


class JaxLM(TemplateLM):
    """A jaxllm decoder as an lm_eval model. `params` live on `mesh` (sharded by `rules`); `add_bos`: contexts
    start with BOS as the model's tokenizer would add it. `batch_size`: rows per forward pass over all devices
    and processes (rounded up to a multiple of the data-parallel size)."""

    backend = "causal"

    def __init__(self, graphdef: nnx.GraphDef, params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, mesh,
                 rules, *, add_bos: bool, batch_size: int = 32, max_gen_toks: int = 256, seed: int = 0,
                 name: str = "jaxllm"):
        super().__init__()
        if model_cfg.arch != "decoder" or model_cfg.electra_generator is not None:
            raise JaxllmError(f"{name} is an {model_cfg.arch} model; lm-evaluation-harness tasks are scored here "
                              "with decoder (causal LM) models")
        if batch_size < 1:
            raise JaxllmError(f"the evaluation batch size must be >= 1, got {batch_size}")
        self.graphdef, self.params, self.model_cfg, self.tok = graphdef, params, model_cfg, tokenizer
        self.mesh, self.rules = mesh, rules
        self.add_bos = add_bos and tokenizer.bos_id is not None
        per_step = sharding.data_parallel_size(mesh, rules)
        per_step = per_step * jax.process_count() // np.gcd(per_step, jax.process_count())
        self.batch_size = int(-(-batch_size // per_step) * per_step)
        self._max_gen_toks, self.seed, self.name = max_gen_toks, seed, name
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        if self.eot_token_id is None:
            raise JaxllmError(f"{name}'s tokenizer has no EOS token; lm_eval needs one to end generations")

    # ------------------------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model_cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM: BOS first when the tokenizer adds it (unless `add_special_tokens` is False, or the text
        already starts with BOS's spelling)."""
        bos_text = self.tok.id_to_token(self.prefix_token_id)
        add = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            add = False
        return ([self.tok.bos_id] if add else []) + self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) of (cache key, context ids, continuation ids) requests."""
        rows: dict[tuple[int, ...], _Row] = {}
        placed = []  # per request: (row key, first scored position, its last token)
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise JaxllmError(f"a request has {len(context)} context and {len(continuation)} continuation "
                                  f"tokens; both must be 1..{self.max_length} (the model's context)")
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs = whole[:-1]
            row = rows.setdefault(tuple(inputs), _Row(inputs, []))
            if whole[-1] not in row.candidates:
                row.candidates.append(whole[-1])
            placed.append((tuple(inputs), len(inputs) - len(continuation), whole[-1]))
        order = sorted(rows, key=lambda key: (-len(key), key))  # longest first, as HFLM
        scored = dict(zip(order, self._score([rows[k] for k in order], disable_tqdm)))
        results = []
        for key, start, last in placed:
            logp_L, greedy_L, cand_logp, argmax = scored[key]
            end = len(key) - 1  # the last position scores `last` among the row's candidates
            k = rows[key].candidates.index(last)
            total = float(np.sum(logp_L[start:end], dtype=np.float64) + cand_logp[k])
            results.append((total, bool(np.all(greedy_L[start:end]) and argmax == last)))
        for (cache_key, _, _), answer in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results

    def _score(self, rows: list[_Row], disable_tqdm: bool) -> list[tuple]:
        """`score_rows` of this process's `rows` (sorted longest first), `batch_size` rows at a time over all
        processes; every process runs the same batches, their shapes agreed first."""
        local = self.batch_size // self.world_size
        batches = [rows[i:i + local] for i in range(0, len(rows), local)]
        shapes = _max_over_processes([(max(len(r.inputs) for r in b), max(len(r.candidates) for r in b))
                                      for b in batches])
        out: list[tuple] = []
        bar = tqdm(total=len(rows), desc="scoring", disable=disable_tqdm or self.rank != 0, leave=False)
        for index, (width, candidates) in enumerate(shapes):
            batch = batches[index] if index < len(batches) else []
            width = min(max(MIN_WIDTH, _next_pow2(width)), self.max_length)
            inputs = np.full((local, width), self.tok.pad_id, np.int32)
            segments = np.zeros((local, width), np.int32)
            last = np.zeros((local,), np.int32)
            cands = np.zeros((local, _next_pow2(candidates)), np.int32)
            for i, row in enumerate(batch):
                n = len(row.inputs)
                inputs[i, :n], segments[i, :n], last[i] = row.inputs, 1, n - 1
                cands[i, :len(row.candidates)] = row.candidates
            with sharding.activate(self.mesh, self.rules):
                result = score_rows(self.params, *map(self._global, (inputs, segments, last, cands)),
                                    graphdef=self.graphdef, chunk=LOGITS_CHUNK)
            logp, greedy, cand_logp, argmax = (_local_rows(a) for a in result)
            out += [(logp[i], greedy[i], cand_logp[i], int(argmax[i])) for i in range(len(batch))]
            bar.update(len(batch))
        bar.close()
        return out

    def _global(self, local: np.ndarray) -> jax.Array:
        """This process's rows of a batch as a global array, split over the data-parallel axes."""
        shape = (local.shape[0] * self.world_size, *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, self.rules, local.ndim),
                                                      local, shape)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: HFLM's disjoint windows of at most max_length tokens, each
        window conditioned on the tokens before it (the first on the prefix token)."""
        windows, counts = [], []
        for (text,) in (req.args for req in requests):
            tokens = self.tok_encode(text)
            doc = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            windows += [(None, context, continuation) for context, continuation in doc]
            counts.append(len(doc))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for req, count in zip(requests, counts):
            total = sum(logp for logp, _ in scores[at:at + count])
            at += count
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ------------------------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations with jaxllm's KV-cache sampler, cut at the task's
        stop sequences and EOS as HFLM cuts them; stop sequences that are one token also end a row early."""
        everyone = _allgather_objects([req.args for req in requests])
        mine = sum(len(p) for p in everyone[: self.rank])
        args = [a for process in everyone for a in process]
        collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]), group_by="gen_kwargs",
                            group_fn=lambda a: a[1])
        eos_text = self.tok.id_to_token(self.eot_token_id)
        results = []
        bar = tqdm(total=len(args), desc="generating", disable=disable_tqdm or self.rank != 0, leave=False)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, kwargs_list = zip(*chunk)
            kwargs = normalize_gen_kwargs(kwargs_list[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            gen, room = self._generate_config(kwargs)
            prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
            width = min(max(MIN_WIDTH, _next_pow2(max(map(len, prompts)))), room)
            dummies = [[self.prefix_token_id]] * (self.batch_size - len(prompts))
            stops = sorted({self.eot_token_id, *self._one_token_stops(until)})
            # One process: the batch split over the devices. Several: as `jaxllm generate` runs (the sampler
            # returns its tokens to every process only when the batch is not split across processes).
            placed = sharding.activate(self.mesh, self.rules) if self.world_size == 1 else contextlib.nullcontext()
            with placed:
                outputs = generate(self.graphdef, self.params, self.model_cfg, prompts + dummies, gen, stops,
                                   self.tok.pad_id, width=width)
            for new_ids in outputs[: len(prompts)]:
                results.append(postprocess_generated_text(self.tok_decode(new_ids), until, None))
            bar.update(len(prompts))
        bar.close()
        results = collator.get_original(results)[mine: mine + len(requests)]
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    def _generate_config(self, kwargs: dict) -> tuple[GenerateConfig, int]:
        """The sampler's settings from a request's normalised gen_kwargs, and the prompt tokens that fit."""
        max_new = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_new
        if room < 1:
            raise JaxllmError(f"a task asks for {max_new} new tokens, but the model's context is {self.max_length}; "
                              "lower the task's max_gen_toks (generation_kwargs) below it")
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature") or 0.0) > 0.0
        gen = GenerateConfig(max_new_tokens=max_new, temperature=float(kwargs["temperature"]) if sample else 0.0,
                             top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                             top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0, seed=self.seed)
        return gen, room

    def _one_token_stops(self, until: list[str]) -> list[int]:
        """Ids of tokens that spell a stop sequence exactly: emitting one puts the sequence in the text, so
        the row may end there (the text is cut at the first stop sequence anyway)."""
        ids = []
        for text in until:
            encoded = self.tok.encode(text) if text else []
            if len(encoded) == 1 and self.tok.decode(encoded) == text:
                ids.append(encoded[0])
        return ids

    # ------------------------------------------------------------------------------------ processes

    def all_gather(self, tensor):
        """lm_eval's request counts per process (a torch tensor), joined in process order."""
        if self.world_size == 1:
            return tensor
        import torch

        parts = _allgather_objects(np.atleast_1d(tensor.cpu().numpy()))
        return torch.as_tensor(np.concatenate(parts))

    def gather_object(self, obj, dst=0):
        parts = _allgather_objects(obj)
        return parts if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            multihost_utils.sync_global_devices("jaxllm.eval")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": models.param_counts(self.model_cfg)["total"],
                "model_dtype": self.model_cfg.param_dtype, "model_name": self.name}


def load_lm(path: str | Path, batch_size: int = 32, max_gen_toks: int = 256, seed: int = 0) -> JaxLM:
    """A JaxLM of the model at `path` (a jaxllm run directory or checkpoint, or a Hugging Face directory),
    its parameters sharded fsdp-style over all devices as `jaxllm generate` loads them."""
    from jaxllm.data.tokenizer import load_tokenizer_from_files
    from jaxllm.train.frozen import open_pretrained

    pretrained = open_pretrained(path)
    if not pretrained.tokenizer_files:
        raise JaxllmError(f"{path} carries no tokenizer files (tokenizer.json or tokenizer.model); evaluation "
                          "needs the model's tokenizer beside it")
    tokenizer = load_tokenizer_from_files(pretrained.tokenizer_files)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = sharding.make_rules()
    params = pretrained.params(mesh, rules)
    graphdef = models.model_spec(pretrained.config)[0]
    add_bos = _adds_bos(pretrained, tokenizer)
    return JaxLM(graphdef, params, pretrained.config, tokenizer, mesh, rules, add_bos=add_bos, batch_size=batch_size,
                 max_gen_toks=max_gen_toks, seed=seed, name=str(path))


def _adds_bos(pretrained, tokenizer: Tokenizer) -> bool:
    """Whether the model's own tokenizer starts a text with BOS: a Hugging Face directory's tokenizer_config.json
    (add_bos_token) or else its tokenizer.json's post-processor; a jaxllm run's data.add_bos."""
    files = pretrained.tokenizer_files
    if (Path(pretrained.path) / "config.json").is_file():
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        if isinstance(config.get("add_bos_token"), bool):
            return config["add_bos_token"]
        if "tokenizer.json" not in files or tokenizer.bos_id is None:
            return False
        from tokenizers import Tokenizer as RustTokenizer

        framed = RustTokenizer.from_str(files["tokenizer.json"].decode("utf-8")).encode("a").ids
        return framed[:1] == [tokenizer.bos_id]
    from jaxllm.train.checkpoint import find_checkpoint

    checkpointer, step = find_checkpoint(pretrained.path)
    return checkpointer.restore_meta(step, with_data=False).config.data.add_bos


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded result, in the order it gave them (the inverse of
    make_array_from_process_local_data)."""
    shards = {s.index[0].start or 0: s for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def _to_json(obj: Any) -> Any:
    """`obj` as JSON values, with tuples, dicts with non-string keys (lm-eval's raw metrics are keyed by
    (metric, filter)) and numpy values tagged so `_from_json` rebuilds them; no code is named or run."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _to_json(v) for k, v in obj.items()}}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return [_to_json(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    if isinstance(obj, dict):
        if "__tuple__" in obj:
            return tuple(_from_json(x) for x in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _from_json(v) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {_from_json(k): _from_json(v) for k, v in obj["__items__"]}
        if "__array__" in obj:
            return np.asarray(obj["__array__"], np.dtype(obj["dtype"]))
    return obj


def _allgather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (as torch.distributed.gather_object gives them), exchanged
    between this run's own processes as tagged JSON (`_to_json`): plain data only, nothing unpickled."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(_to_json(obj)).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [_from_json(json.loads(gathered[i, : sizes[i]].tobytes().decode("utf-8"))) for i in range(len(sizes))]


def _max_over_processes(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per batch index, the largest (width, candidates) any process needs; as many batches as the process
    with the most (the others pad with empty batches)."""
    everyone = _allgather_objects(shapes)
    count = max(map(len, everyone))
    return [tuple(max(s[i][j] if i < len(s) else 0 for s in everyone) for j in range(2)) for i in range(count)]
