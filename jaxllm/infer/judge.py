"""A pairwise judge: which of two responses to a prompt a judge model prefers, and how confidently.

The judge reads a comparison prompt (a template with `{prompt}`, `{response_a}`, `{response_b}`; the default
one below), rendered as a user message with the judge's chat template when its tokenizer carries one, else as
plain text. Its verdict is its next-token distribution, read at the last prompt position: the probabilities
of the two answer labels ("A" / "B"; with a chat template the label follows the assistant's generation prompt
directly, in plain text after a space, as in "Answer: A"). Nothing is sampled.

Judges prefer a position (the first response, often). Each comparison is therefore asked in both orders, in
the same forward pass: once with the first response as "A", once with it as "B". With the two labels'
probabilities renormalised to each other (p_A / (p_A + p_B)), the probability that response a wins is the
mean over the two orders; a judge that only looks at positions gets exactly 0.5 (a tie) whatever its bias.
The winner is the response with that mean above 0.5, and the confidence is the mean probability that the
winner wins (0.5 to 1).

Prompts are left-padded to a few bucket lengths (powers of two) and run in batches of `batch_size`
comparisons (2 x batch_size rows), the batch split over all devices and the judge's parameters sharded
fsdp-style as `jaxllm generate` shards them; only the last position's logits are computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm import sharding
from jaxllm.config import Config, JaxllmError, MeshConfig
from jaxllm.data.chat_template import ChatTemplate
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.infer.generate import left_pad
from jaxllm.infer.load import LoadedModel
from jaxllm.models import bind, model_spec
from jaxllm.train.checkpoint import find_checkpoint
from jaxllm.train.frozen import open_pretrained

DEFAULT_TEMPLATE = """\
Two AI assistants answered the same instruction. Decide which response is better: more helpful, correct, \
relevant and clear. Judge the content only; the order of the responses and their length say nothing.

## Instruction
{prompt}

## Response A
{response_a}

## Response B
{response_b}

## Verdict
Reply with one letter: A if Response A is better, B if Response B is better.
Answer:"""
DEFAULT_LABELS = ("A", "B")
PLACEHOLDERS = ("prompt", "response_a", "response_b")
_PLACEHOLDER = re.compile(r"\{(prompt|response_a|response_b)\}")


def open_model(path: str | Path, tokenizer: str | None = None, mesh=None) -> LoadedModel:
    """A jaxllm run directory or checkpoint (a LoRA run merged into its base), or a Hugging Face model
    directory, loaded for inference: parameters sharded fsdp-style over all devices (or `mesh`), the tokenizer
    its files carry unless `tokenizer` (any path `load_tokenizer` takes) replaces it. A Hugging Face model
    gets the default `Config` around its model config (BOS first on plain-text prompts, as converted runs)."""
    pretrained = open_pretrained(path)
    if (Path(path) / "config.json").is_file():  # a Hugging Face directory, as open_pretrained tells them apart
        cfg, step = Config(model=pretrained.config), 0
    else:  # the run's own settings (data.add_bos, mesh.rules) around the plain model
        checkpointer, step = find_checkpoint(path)
        cfg = dataclasses.replace(checkpointer.restore_meta(step, with_data=False).config, model=pretrained.config)
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = pretrained.params(mesh, sharding.make_rules(cfg.mesh.rules))
    files = pretrained.tokenizer_files
    tok = load_tokenizer(tokenizer) if tokenizer else load_tokenizer_from_files(files) if files else None
    if tok is None:
        raise JaxllmError(f"{path} carries no tokenizer; pass --tokenizer PATH (a tokenizer.json or a directory "
                          "with one, a SentencePiece .model, or builtin:kjv-sp4k)")
    if tok.vocab_size > cfg.model.vocab_size:
        raise JaxllmError(f"tokenizer {tokenizer or path} has {tok.vocab_size} tokens but the model {path} only "
                          f"{cfg.model.vocab_size}; give the tokenizer the model was trained with")
    return LoadedModel(cfg, model_spec(cfg.model)[0], params, tok, tok.files(), step)


def load_template(path: str | None) -> str:
    """The comparison template of `--template FILE` (default: DEFAULT_TEMPLATE), checked for its placeholders."""
    if path is None:
        return DEFAULT_TEMPLATE
    if not Path(path).is_file():
        raise JaxllmError(f"--template {path} does not exist; give a text file with {{prompt}}, {{response_a}} "
                          "and {response_b} in it")
    text = Path(path).read_text(encoding="utf-8")
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" not in text]
    if missing:
        raise JaxllmError(f"--template {path} lacks {', '.join(missing)}; the judge's prompt must show the "
                          "instruction and both responses ({prompt}, {response_a}, {response_b})")
    return text


def fill(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """The template with its placeholders replaced in one pass (braces in the texts, or elsewhere in the
    template, stay as they are)."""
    values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One comparison of responses a and b: `prob_a_first` is the probability that a wins when shown first
    (as label A), `prob_b_first` that b wins when shown first; each renormalised over the two labels."""

    prob_a_first: float
    prob_b_first: float

    @property
    def prob_a(self) -> float:
        """The order-averaged probability that a wins: (P(a wins, a first) + P(a wins, a second)) / 2. A judge
        that sees only positions has prob_a_first == prob_b_first, so exactly 0.5."""
        return 0.5 + (self.prob_a_first - self.prob_b_first) / 2

    @property
    def prob_a_second(self) -> float:
        """The probability that a wins when shown second."""
        return 1.0 - self.prob_b_first

    @property
    def winner(self) -> str:
        """"a", "b" or "tie"."""
        return "a" if self.prob_a > 0.5 else "b" if self.prob_a < 0.5 else "tie"

    @property
    def confidence(self) -> float:
        """The order-averaged probability that the winner wins, in [0.5, 1]."""
        return max(self.prob_a, 1.0 - self.prob_a)


class Judge:
    """A loaded judge model with its comparison template and answer labels; `compare` gives verdicts."""

    def __init__(self, model: LoadedModel, template: str = DEFAULT_TEMPLATE,
                 labels: Sequence[str] = DEFAULT_LABELS, batch_size: int = 8, progress: bool = True):
        if model.config.model.arch != "decoder":
            raise JaxllmError(f"the judge must be a decoder (it answers with a next token); this model is a "
                              f"model.arch={model.config.model.arch}")
        if model.config.model.head == "reward":
            raise JaxllmError("the judge is a reward model (model.head=reward): it scores responses, it does not "
                              "answer; use `jaxllm score --model ...` for it, or a language model as the judge")
        if len(labels) != 2 or labels[0] == labels[1] or not all(labels):
            raise JaxllmError("the judge needs two different, non-empty answer labels (--labels A,B), got "
                              f"{list(labels)}")
        if batch_size < 1:
            raise JaxllmError(f"--batch-size must be >= 1, got {batch_size}")
        self.model, self.template, self.labels = model, template, tuple(labels)
        self.batch_size, self.progress = batch_size, progress
        tok = model.tokenizer
        self.chat = ChatTemplate(tok.chat_template, "the judge's chat template") if tok.chat_template else None
        self._not_text = tok.special_ids()
        mesh = jax.tree.leaves(model.params)[0].sharding.mesh
        self._rows = sharding.batch_sharding(mesh, sharding.make_rules(model.config.mesh.rules), 2)
        self._multiple = sharding.data_parallel_size(mesh, sharding.make_rules(model.config.mesh.rules))

    def render(self, prompt: str, first: str, second: str) -> str:
        """The judge's prompt text for this order (`first` shown as response A)."""
        text = fill(self.template, prompt, first, second)
        if self.chat is None:
            return text
        return self.chat.render([{"role": "user", "content": text}], True, self.model.tokenizer.special_tokens())

    def encode(self, prompt: str, first: str, second: str) -> tuple[list[int], tuple[int, int]]:
        """The rendered prompt's token ids (BOS first in plain text when the model was trained so) and the ids of
        the two labels as the judge's next token."""
        return self.encode_many([(prompt, first, second)])[0]

    def encode_many(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[list[int], tuple[int, int]]]:
        """`encode` of each (prompt, first, second), the tokenizer called on all texts at once."""
        tok: Tokenizer = self.model.tokenizer
        texts = [self.render(*item) for item in items]
        answers = [label if self.chat is not None else " " + label for label in self.labels]
        if self.chat is not None:  # the template's special tokens as their ids, as the judge was trained
            encoded = [[tok.encode_rendered(text + answer) for text in texts] for answer in ["", *answers]]
        else:
            encoded = [tok.encode_batch([text + answer for text in texts]) for answer in ["", *answers]]
        bos = [tok.bos_id] if self.chat is None and self.model.config.data.add_bos and tok.bos_id is not None else []
        return [(bos + ids, tuple(self._label_id(tok, ids, full, answer) for full, answer in zip(fulls, answers)))
                for ids, *fulls in zip(*encoded)]

    def _label_id(self, tok: Tokenizer, ids: list[int], full: list[int], answer: str) -> int:
        """The one token `answer` adds to the prompt's ids `ids` (`full`: the ids of prompt + answer)."""
        new = full[len(ids):]
        if full[:len(ids)] != ids or len(new) != 1:
            pieces = [tok.id_to_token(i) for i in new] if full[:len(ids)] == ids else "it merges with the prompt's end"
            raise JaxllmError(f"the answer label {answer.strip()!r} is not one token of the judge's vocabulary after "
                              f"the prompt ({answer!r} encodes as {pieces}); choose labels the judge writes as single "
                              "tokens, e.g. --labels A,B")
        if new[0] in self._not_text or new[0] >= self.model.config.model.vocab_size:
            raise JaxllmError(f"the answer label {answer.strip()!r} is not in the judge's vocabulary (it encodes as "
                              f"the special token {tok.id_to_token(new[0])!r}); choose labels it has, e.g. "
                              "--labels A,B")
        return new[0]

    def label_logprobs(self, rows: Sequence[tuple[list[int], tuple[int, int]]], group: int = 1,
                       advance=lambda n: None) -> np.ndarray:
        """log-probabilities [N, 2] of the two label ids of each row (its prompt ids, its label ids) as the
        judge's next token, in batches of 2 x batch_size rows padded to a bucket length. Rows are sorted by
        length in groups of `group` consecutive rows that stay in one batch; `advance(rows)` after each batch."""
        context = self.model.config.model.max_seq_len
        pad = self.model.tokenizer.pad_id
        per_batch = 2 * self.batch_size // group * group
        longest = [max(len(ids) for ids, _ in rows[g:g + group]) for g in range(0, len(rows), group)]
        order = sorted(range(len(rows)), key=lambda i: (longest[i // group], i))
        width = -(-per_batch // self._multiple) * self._multiple  # the rows split evenly over the devices
        out = np.zeros((len(rows), 2), np.float64)
        for start in range(0, len(order), per_batch):
            chosen = order[start:start + per_batch]
            batch = [rows[i] for i in chosen]
            batch += [batch[-1]] * (width - len(batch))  # every batch full: one compiled shape per bucket
            tokens, mask = left_pad([ids for ids, _ in batch], pad)
            bucket = min(max(16, 1 << (tokens.shape[1] - 1).bit_length()), context)
            tokens = np.pad(tokens, ((0, 0), (bucket - tokens.shape[1], 0)), constant_values=pad)
            mask = np.pad(mask, ((0, 0), (bucket - mask.shape[1], 0)))
            labels = np.asarray([lab for _, lab in batch], np.int32)
            logp = _label_logprobs(self.model.params, *map(self._put, (tokens, mask, labels)),
                                   graphdef=self.model.graphdef)
            out[chosen] = np.asarray(jax.device_get(logp), np.float64)[: len(chosen)]
            advance(len(chosen))
        return out

    def _put(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self._rows, lambda index: array[index])

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict | None]:
        """A verdict for each (prompt, response_a, response_b); None where the judge's prompt is longer than its
        context (the caller counts those). Both orders of a comparison run in the same batch."""
        context = self.model.config.model.max_seq_len
        both = self.encode_many([order for p, a, b in items for order in ((p, a, b), (p, b, a))])
        rows, where = [], []
        for index in range(len(items)):
            pair = both[2 * index:2 * index + 2]
            if max(len(ids) for ids, _ in pair) <= context:
                rows += pair
                where.append(index)
        verdicts: list[Verdict | None] = [None] * len(items)
        bar = tqdm(total=len(where), desc="judging", unit="pair", dynamic_ncols=True,
                   disable=not self.progress or jax.process_index() != 0)
        logp = self.label_logprobs(rows, group=2, advance=lambda n: bar.update(n // 2))
        bar.close()
        for k, index in enumerate(where):
            first, second = logp[2 * k], logp[2 * k + 1]
            # P(label A) / (P(A) + P(B)) = sigmoid(logp_A - logp_B): a is label A in the first order, b in the second.
            verdicts[index] = Verdict(_sigmoid(first[0] - first[1]), _sigmoid(second[0] - second[1]))
        return verdicts


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _label_logprobs(params: Any, tokens_BL, mask_BL, labels_B2, *, graphdef) -> jax.Array:
    """log p(label) [B, 2] of the next token after left-padded prompts; logits only at the last position."""
    model = bind(graphdef, params)
    positions_BL = jnp.maximum(jnp.cumsum(mask_BL, axis=1) - 1, 0)
    x_BLD, _, _ = model.hidden(tokens_BL, positions_BL, mask_BL)
    logits_BV = model.logits(x_BLD[:, -1:])[:, 0].astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), labels_B2, axis=1)


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (95% by default). Ties count as half a success,
    so `successes` may end in .5."""
    if n <= 0:
        raise JaxllmError("no comparisons to compute a win-rate from")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
