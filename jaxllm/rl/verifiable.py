"""Built-in verifiable rewards (TRL's signature: f(prompts, completions, **fields) -> list[float | None]).

The completion's text: a string as is; a message list (conversational) its messages' contents joined. Every
reward first cuts the text at the first of `stop` (default END_OF_TURN: the end-of-turn / EOS texts of
common chat templates, for decoders that keep them in the decoded text).

- `exact_match` (args: answer_field="answer", ignore_case=False, normalize_whitespace=False, stop): 1.0 when
  the completion, cut at `stop` and stripped, equals the record's answer stripped, else 0.0. ignore_case
  compares casefolded texts; normalize_whitespace collapses runs of whitespace to one space. A record without
  an answer (None) is not scored (None).
- `numeric` (args: answer_field="answer", rel_tol=0, abs_tol=1e-6, stop): 1.0 when the completion's number
  equals the answer's within math.isclose(rel_tol, abs_tol), else 0.0 (also when the completion has none).
  A text's number: inside the last `\\boxed{...}` when it has one, else the whole text (for the answer, the
  part after the last `####` when it has one, GSM8K's convention); its last number: an optional sign, digits
  with optional thousands commas (1,234,567), an optional decimal part (.5 and 3. too), or a fraction a/b
  or \\frac{a}{b} (\\dfrac, \\tfrac); a trailing % is ignored; digits glued to a word (x2, H2O) are no
  number. An answer without a number is not scored.
- `format` (args: pattern (required), mode="fullmatch" | "search" | "match", dotall=True, stop): 1.0 when
  the regex matches the completion (cut at `stop`, not stripped) in that mode, else 0.0.
- `length` (args: max_length (required), cache=max_length // 4): DAPO's soft overlong punishment (TRL's
  get_soft_overlong_punishment) of the completion's length L in tokens (`completion_ids`; in characters
  when the caller passes none): 0 when L <= max_length - cache, (max_length - cache - L) / cache up to
  max_length, -1 beyond.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from jaxllm.config import ConfigError, JaxllmError

END_OF_TURN = ("</s>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<eos>")

_NUMBER = re.compile(
    r"\\[dt]?frac\{\s*([-+]?\d+(?:\.\d+)?)\s*\}\{\s*([-+]?\d+(?:\.\d+)?)\s*\}"  # \frac{a}{b}
    r"|(?:(?<![\w.)])([-+]))?"  # a sign not glued to a word, number or bracket before it (3-4: 3 and 4)
    r"(?<![\w.])((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?![\d,]\d)"  # 1,234.5 / 12 / 3. / .5 (not x2)
    r"(?:\s*/\s*(\d+(?:\.\d+)?))?"  # a fraction's denominator
)


def text_of(completion: Any) -> str:
    """A completion's text: a string, or the contents of a message list joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(text_of(m) for m in completion)
    raise JaxllmError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def cut(text: str, stop: Sequence[str]) -> str:
    """`text` before the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def _answers(fields: dict, answer_field: str, name: str, n: int) -> list:
    if answer_field not in fields:
        have = [k for k in fields if k != "completion_ids"]
        raise JaxllmError(f"reward {name}: the records have no field {answer_field!r} (they have "
                          f"{', '.join(map(repr, have)) or 'none'}); set args.answer_field to the field holding "
                          "the reference answer")
    answers = fields[answer_field]
    if len(answers) != n:
        raise JaxllmError(f"reward {name}: {len(answers)} values of {answer_field!r} for {n} completions")
    return list(answers)


def _normal(text: str, ignore_case: bool, normalize_whitespace: bool) -> str:
    text = text.strip()
    if normalize_whitespace:
        text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def exact_match(prompts: list, completions: list, *, answer_field: str = "answer", ignore_case: bool = False,
                normalize_whitespace: bool = False, stop: Sequence[str] = END_OF_TURN, **fields) -> list:
    answers = _answers(fields, answer_field, "exact_match", len(completions))
    out: list[float | None] = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            out.append(None)
            continue
        said = _normal(cut(text_of(completion), stop), ignore_case, normalize_whitespace)
        out.append(float(said == _normal(text_of(answer), ignore_case, normalize_whitespace)))
    return out


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return text[i + 1:]  # unclosed: what follows


def last_number(text: str) -> float | None:
    """The value of the last number of `text` (module docstring), or None when it has none. A fraction with
    denominator 0 is NaN (equal to nothing)."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if m.group(1) is not None:
        numerator, denominator = float(m.group(1)), float(m.group(2))
        sign = 1.0
    else:
        numerator, denominator = float(m.group(4).replace(",", "")), m.group(5)
        denominator = float(denominator) if denominator is not None else 1.0
        sign = -1.0 if m.group(3) == "-" else 1.0
    return sign * numerator / denominator if denominator != 0 else float("nan")


def number_in(text: str, answer: bool = False) -> float | None:
    """A completion's (or, `answer`, a reference answer's) number: module docstring."""
    boxed = _boxed(text)
    if boxed is not None:
        text = boxed
    elif answer and "####" in text:
        text = text.rsplit("####", 1)[1]
    return last_number(text)


def numeric(prompts: list, completions: list, *, answer_field: str = "answer", rel_tol: float = 0.0,
            abs_tol: float = 1e-6, stop: Sequence[str] = END_OF_TURN, **fields) -> list:
    answers = _answers(fields, answer_field, "numeric", len(completions))
    out: list[float | None] = []
    for completion, answer in zip(completions, answers):
        target = None if answer is None else number_in(str(text_of(answer) if not isinstance(answer, (int, float))
                                                           else answer), answer=True)
        if target is None:
            out.append(None)
            continue
        said = number_in(cut(text_of(completion), stop))
        out.append(float(said is not None and math.isclose(said, target, rel_tol=rel_tol, abs_tol=abs_tol)))
    return out


_FLAGS_CACHE: dict[tuple[str, bool], re.Pattern] = {}


def _compiled(pattern: str, dotall: bool) -> re.Pattern:
    key = (pattern, dotall)
    if key not in _FLAGS_CACHE:
        _FLAGS_CACHE[key] = re.compile(pattern, re.DOTALL if dotall else 0)
    return _FLAGS_CACHE[key]


def format_reward(prompts: list, completions: list, *, pattern: str, mode: str = "fullmatch", dotall: bool = True,
                  stop: Sequence[str] = END_OF_TURN, **fields) -> list:
    regex = _compiled(pattern, dotall)
    match = {"fullmatch": regex.fullmatch, "search": regex.search, "match": regex.match}[mode]
    return [float(match(cut(text_of(c), stop)) is not None) for c in completions]


def length(prompts: list, completions: list, *, max_length: int, cache: int | None = None,
           completion_ids: list | None = None, **fields) -> list:
    cache = max_length // 4 if cache is None else cache
    sizes = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(text_of(c))
                                                                                     for c in completions]
    out = []
    for size in sizes:
        if size <= max_length - cache:
            out.append(0.0)
        elif size <= max_length:
            out.append((max_length - cache - size) / cache)
        else:
            out.append(-1.0)
    return out


format_reward.__name__ = "format"
VERIFIABLE = {"exact_match": exact_match, "numeric": numeric, "format": format_reward, "length": length}


def check_args(name: str, args: dict, where: str) -> None:
    """One-line ConfigErrors for a built-in's arguments that are missing or wrong (checked when the config loads,
    not at the first rollout)."""
    def need(key: str, types: tuple, what: str):
        if key in args and (not isinstance(args[key], types) or isinstance(args[key], bool) and bool not in types):
            raise ConfigError(f"{where}.args.{key} must be {what}, got {args[key]!r}")

    need("answer_field", (str,), "a field name")
    need("stop", (list, tuple), "a list of strings")
    need("rel_tol", (int, float), "a number")
    need("abs_tol", (int, float), "a number")
    if name == "format":
        if "pattern" not in args:
            raise ConfigError(f"{where}.args.pattern is missing: the format reward needs a regex, e.g. "
                              "'<think>.*</think>\\s*<answer>.*</answer>'")
        need("pattern", (str,), "a regex string")
        if args.get("mode", "fullmatch") not in ("fullmatch", "search", "match"):
            raise ConfigError(f"{where}.args.mode must be fullmatch, search or match, got {args['mode']!r}")
        try:
            _compiled(args["pattern"], bool(args.get("dotall", True)))
        except re.error as e:
            raise ConfigError(f"{where}.args.pattern {args['pattern']!r} is not a valid regex: {e}") from None
    if name == "length":
        if not isinstance(args.get("max_length"), int) or isinstance(args.get("max_length"), bool) \
                or args["max_length"] < 1:
            raise ConfigError(f"{where}.args.max_length must be a positive integer (the longest completion without "
                              f"penalty), got {args.get('max_length')!r}")
        cache = args.get("cache", args["max_length"] // 4)
        if not isinstance(cache, int) or isinstance(cache, bool) or not 0 < cache <= args["max_length"]:
            raise ConfigError(f"{where}.args.cache must be an integer in 1..max_length ({args['max_length']}), got "
                              f"{cache!r}")
