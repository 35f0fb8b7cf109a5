"""Rewards for online RL: functions of (prompts, completions, the records' fields) -> one score per completion.

A reward function follows TRL's GRPOTrainer convention:

    f(prompts: list, completions: list, **fields) -> list[float | None]

`prompts[i]` and `completions[i]` are the i-th sample (the n samples of one prompt consecutive); a string
each, or, for a conversational prompt (a list of messages), the completion as a message list
`[{"role": "assistant", "content": text}]` (TRL: conversational prompt -> conversational completion).
`fields` are the records' other columns, one list each aligned with the completions (the record of sample i
repeated for each of its n samples), plus `completion_ids` (the generated token ids, list of lists) when the
caller has them and whatever the caller adds (e.g. TRL's `trainer_state`). A function returns one float per
completion, or None for a sample it does not score (e.g. a math reward on a non-math task).

The config list `rl.rewards` names the functions (`RewardSpec`: a built-in name, `module:function` or
`path/to/file.py:function`, a weight, keyword arguments). Built-ins (exact rules: VERIFIABLE in
jaxllm.rl.verifiable): `exact_match`, `numeric`, `format`, `length` (DAPO's soft overlong punishment); model
rewards: `reward_model` (a `model.head: reward` model's score) and `judge` (a judge model's probability
that the completion beats the record's reference answer), in jaxllm.rl.model_rewards.

`compute_rewards` follows TRL's `_calculate_rewards`: None becomes NaN, the total is the weighted sum over
the functions that scored the sample (nansum), and a sample no function scored gets a NaN total (with a
warning) -- the trainer gives it advantage 0 and leaves it out of the group baseline, as TRL does.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxllm.config import ConfigError, JaxllmError, RewardSpec
from jaxllm.rl import verifiable

log = logging.getLogger("jaxllm")

RewardFunction = Callable[..., list]
MODEL_REWARDS = ("reward_model", "judge")  # built from args (a model path) in jaxllm.rl.model_rewards
RESERVED = ("prompts", "completions")  # not fields: the two positional arguments


def builtin_names() -> list[str]:
    return sorted([*verifiable.VERIFIABLE, *MODEL_REWARDS])


def load_function(target: str, where: str = "rl.rewards") -> Callable:
    """The callable named by `module:function` (an importable module) or `path/to/file.py:function`."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {target!r} is neither a built-in reward ({', '.join(builtin_names())}) nor "
                          "'module:function' / 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"{where}: reward file {module_name} does not exist; give an existing .py file as "
                              "'path/to/file.py:function'")
        name = f"jaxllm_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)  # a file named twice (or checked, then built) runs once
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before running it: dataclasses in the file look themselves up there
            try:
                spec.loader.exec_module(module)  # an error in the user's file shows with its traceback
            except BaseException:
                sys.modules.pop(name, None)  # no half-run module left behind
                raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"{where}: cannot import module {module_name!r} ({e}); put it on PYTHONPATH or give "
                              "a file as 'path/to/file.py:function'") from None
    func = getattr(module, attr, None)
    if func is None:
        raise ConfigError(f"{where}: {module_name} has no {attr!r}; name a function defined in it")
    if not callable(func):
        raise ConfigError(f"{where}: {target} is a {type(func).__name__}, not a function; name a callable "
                          "f(prompts, completions, **fields) -> list of floats")
    return func


def callable_name(func: Callable) -> str:
    """A reward function's display name (TRL's get_callable_name): partials unwrapped, instances by class."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _bind(func: Callable, args: dict, where: str, builtin: bool = False) -> Callable:
    """`func` with the spec's keyword arguments bound, after checking that it accepts them (a built-in: its
    keyword-only arguments; its **fields are the records')."""
    if not args:
        return func
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return functools.partial(func, **args)
    if builtin:
        params = {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "completion_ids"}
    if builtin or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in args if k not in params]
        if unknown:
            raise ConfigError(f"{where}.args: {callable_name(func)} takes no argument {unknown[0]!r}; its arguments: "
                              f"{', '.join(p for p in params if p not in RESERVED) or 'none'}")
    return functools.partial(func, **args)


def reward_functions(specs: Sequence[RewardSpec | dict], *, mesh=None, rules=None,
                     where: str = "rl.rewards") -> list[tuple[str, float, RewardFunction]]:
    """(name, weight, function) for each spec; names are unique (a repeated one gets _2, _3, ...). Model rewards
    are loaded here (on `mesh`/`rules` when given). Bad specs raise a one-line ConfigError."""
    from jaxllm.rl import model_rewards  # jax and the model loaders: only once rewards are built

    return _build(specs, where, lambda kind, args, at: model_rewards.make(kind, args, at, mesh=mesh, rules=rules))


def check_reward_specs(specs: Sequence[RewardSpec | dict], where: str = "rl.rewards") -> list[str]:
    """The rewards' metric names, after every check `reward_functions` makes but without loading a model: for
    checking a config when it loads (a bad spec fails then, not at the first rollout)."""
    from jaxllm.rl import model_rewards

    return [name for name, _, _ in _build(specs, where, model_rewards.check)]


def _build(specs: Sequence[RewardSpec | dict], where: str, model_reward: Callable) -> list:
    out: list[tuple[str, float, RewardFunction]] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        at = f"{where}.{i}"
        if isinstance(spec, dict):
            spec = RewardSpec(**spec)
        args = {} if spec.args is None else spec.args  # `args:` left empty in YAML
        if not isinstance(args, dict):
            raise ConfigError(f"{at}.args must be a mapping of keyword arguments, got {type(args).__name__} {args!r}")
        if isinstance(spec.weight, bool) or not isinstance(spec.weight, (int, float)) or not math.isfinite(spec.weight):
            raise ConfigError(f"{at}.weight must be a finite number, got {spec.weight!r}")
        args = dict(args)
        if spec.function in verifiable.VERIFIABLE:
            verifiable.check_args(spec.function, args, at)
            func = _bind(verifiable.VERIFIABLE[spec.function], args, at, builtin=True)
            name = spec.function
        elif spec.function in MODEL_REWARDS:
            func, name = model_reward(spec.function, args, at), spec.function
        else:
            func = _bind(load_function(spec.function, at), args, at)
            name = callable_name(func)
        name = spec.name or name
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", float(spec.weight), func))
    if not out:
        raise ConfigError(f"{where} is empty; name at least one reward, e.g. [{{function: exact_match}}]")
    return out


def _columns(records: Sequence[dict]) -> dict[str, list]:
    """The records' fields as columns (a field missing from a record is None there), without prompt/completion."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    skip = {"prompt", "completion", "completion_ids", *RESERVED}
    return {k: [r.get(k) for r in records] for k in keys if k not in skip}


def _as_floats(name: str, values: Any, n: int) -> np.ndarray:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise JaxllmError(f"reward function {name} returned a {type(values).__name__}; it must return a list of one "
                          "float (or None) per completion")
    if len(values) != n:
        raise JaxllmError(f"reward function {name} returned {len(values)} rewards for {n} completions; it must "
                          "return exactly one float (or None) per completion")
    out = np.full(n, np.nan, np.float32)
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise JaxllmError(f"reward function {name} returned {v!r} for completion {i}; rewards are numbers "
                              "(or None for a sample it does not score)")
        out[i] = float(v)
    return out


def compute_rewards(funcs: Sequence[tuple[str, float, RewardFunction]], prompts: Sequence, completions: Sequence,
                    records: Sequence[dict], *, completion_ids: Sequence[Sequence[int]] | None = None,
                    **extra) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total [N] float32, {name: [N] float32}) for N completions; `records[i]` is the record of sample i.

    Each function gets `prompts`, `completions`, the records' fields as lists (not `prompt`/`completion`),
    `completion_ids` when given, and `extra` (passed to every function as is). None -> NaN in its column;
    total = sum of weight * reward over the functions that scored the sample; NaN where none did."""
    n = len(completions)
    if len(prompts) != n or len(records) != n or (completion_ids is not None and len(completion_ids) != n):
        raise JaxllmError(f"compute_rewards needs one prompt, record (and completion_ids) per completion: got "
                          f"{len(prompts)} prompts, {len(records)} records for {n} completions")
    kwargs = {**_columns(records), **extra}
    if completion_ids is not None:
        kwargs["completion_ids"] = [list(map(int, ids)) for ids in completion_ids]
    per: dict[str, np.ndarray] = {}
    for name, _, func in funcs:
        per[name] = _as_floats(name, func(list(prompts), list(completions), **kwargs), n)
    stacked = np.stack([per[name] for name, _, _ in funcs], axis=1)  # [N, F]
    weights = np.asarray([w for _, w, _ in funcs], np.float32)
    unscored = np.isnan(stacked).all(axis=1)
    total = np.nansum(stacked * weights, axis=1).astype(np.float32)
    total[unscored] = np.nan
    if unscored.any():
        i = int(np.flatnonzero(unscored)[0])
        log.warning("no reward function scored %d of %d completions (all returned None), e.g. prompt %r, completion "
                    "%r: they get no advantage; check that a reward applies to every record", int(unscored.sum()), n,
                    prompts[i], completions[i])
    return total, per


def _nanstd(x: np.ndarray) -> float:
    """TRL's nanstd: the standard deviation of the non-NaN values, with Bessel's correction (NaN below 2)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def reward_metrics(total: np.ndarray, per: dict[str, np.ndarray]) -> dict[str, float]:
    """TRL's reward metrics: `rewards/NAME/mean`, `rewards/NAME/std` (over the samples the function scored),
    `reward` and `reward_std` (of the totals, unscored samples left out)."""
    out = {}
    for name, values in per.items():
        out[f"rewards/{name}/mean"] = _nanmean(values)
        out[f"rewards/{name}/std"] = _nanstd(values)
    out["reward"], out["reward_std"] = _nanmean(total), _nanstd(total)
    return out
