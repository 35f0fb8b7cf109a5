"""`jaxllm judge`: AI feedback with a judge model (infer/judge.py).

- Labelling: pairs of responses (`prompt` + `response_a` + `response_b`, or `prompt` + a two-item list
  `completions`; strings, or lists of chat messages as in TRL's conversational format, kept as they come) become
  a preference dataset in TRL's format: `prompt`, `chosen`, `rejected`, plus the judge's
  `confidence`, `chosen_prob_first` / `chosen_prob_second` (the probability that the chosen response wins when
  shown first / second) and `winner` ("a" or "b": which input response was chosen). Ties and pairs below
  `--min-confidence` are dropped and counted. Pairs labelled already (`chosen` + `rejected`) are judged too, and
  the judge's agreement with their labels is reported.
- Win-rate: two models answer the same prompts (greedy or sampled, chat-rendered when a model has a chat
  template); the judge compares the answers; the win-rate of A over B counts ties as half a win, with a 95%
  Wilson score interval.
- Critique and revise (Constitutional AI): a reviser (the judge, or `--reviser`) critiques each response by a
  principle, then rewrites it; the revision becomes `chosen` and the original `rejected`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from jaxllm.config import GenerateConfig, JaxllmError
from jaxllm.data.preference import implicit_prompt
from jaxllm.data.readers import json_objects
from jaxllm.infer.generate import generate_text
from jaxllm.infer.judge import Judge, Verdict, load_template, open_model, wilson_interval
from jaxllm.infer.load import LoadedModel
from jaxllm.train.frozen import open_pretrained
from jaxllm.utils import atomic_write_text

log = logging.getLogger("jaxllm")

CRITIQUE_TEMPLATE = """\
Here is a request and a response to it.

## Request
{prompt}

## Response
{response}

## Principle
{principle}

Say briefly and concretely where the response falls short of the principle."""

REVISE_TEMPLATE = """\
Here is a request, a response to it, and a critique of the response.

## Request
{prompt}

## Response
{response}

## Principle
{principle}

## Critique
{critique}

Rewrite the response so that it follows the principle and meets the critique. Reply with the rewritten \
response only."""


def read_jsonl(path: str, fields: Sequence[str], conversations: bool = False) -> list[dict[str, Any]]:
    """The records of a jsonl file, each checked to hold the string `fields` (one-line errors name file:line);
    `conversations`: also lists of chat messages (TRL's conversational format). `response_a` / `response_b` may
    also come as a two-item list `completions`."""
    records = []
    for number, record in json_objects(path, f"{' + '.join(fields)} records"):
        if "response_a" in fields and "response_a" not in record and "completions" in record:
            pair = record["completions"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise JaxllmError(f"{path}:{number}: 'completions' must be a list of exactly two responses, "
                                  f"got {pair!r:.80}")
            record = {**record, "response_a": pair[0], "response_b": pair[1]}
        elif "response_a" in fields and "response_a" not in record and "chosen" in record and "rejected" in record:
            # Pairs labelled already: the judge's agreement with them is measured (a = chosen).
            prompt, a, b = (record["prompt"], record["chosen"], record["rejected"]) if "prompt" in record else \
                implicit_prompt(record["chosen"], record["rejected"])
            record = {**record, "prompt": prompt, "response_a": a, "response_b": b}
        missing = [name for name in fields if name not in record]
        if missing:
            other = (" (or a two-item list 'completions', or 'chosen' + 'rejected')"
                     if "response_a" in missing else "")
            raise JaxllmError(f"{path}:{number}: the record lacks {', '.join(map(repr, missing))}{other}; it has "
                              f"{', '.join(map(repr, record)) or 'no fields'}")
        wrong = [name for name in fields if not (isinstance(record[name], str) or
                                                 conversations and _is_conversation(record[name]))]
        if wrong:
            kinds = "a string or a list of chat messages ({'role': ..., 'content': ...})" if conversations \
                else "a string"
            raise JaxllmError(f"{path}:{number}: field {wrong[0]!r} must be {kinds}, got {record[wrong[0]]!r:.80}")
        records.append(record)
    if not records:
        raise JaxllmError(f"--data {path} holds no records")
    return records


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def shown(value: str | list[dict]) -> str:
    """The text the judge reads for a field: a string as it is; a conversation's one message's content, or its
    messages as `role: content` lines."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return value[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one a line) or a jsonl file (.jsonl, .json, .jsonl.gz) of records with a `prompt`
    field (a string, or a conversation read as `shown` reads it)."""
    if not Path(path).is_file():
        raise JaxllmError(f"--prompts {path} does not exist; give a text file with one prompt a line, or a jsonl "
                          "file of {\"prompt\": ...} records")
    if path.endswith((".jsonl", ".json", ".jsonl.gz")):
        prompts = [shown(r["prompt"]) for r in read_jsonl(path, ["prompt"], conversations=True)]
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise JaxllmError(f"--prompts {path} holds no prompts")
    return prompts


def preference_rows(records: Sequence[dict], verdicts: Sequence[Verdict | None],
                    min_confidence: float) -> tuple[list[dict], dict[str, int]]:
    """TRL preference rows of the judged records, and the counts of what was kept and dropped."""
    rows, counts = [], {"pairs": len(records), "kept": 0, "ties": 0, "below_min_confidence": 0, "too_long": 0}
    for record, verdict in zip(records, verdicts):
        if verdict is None:
            counts["too_long"] += 1
        elif verdict.winner == "tie":
            counts["ties"] += 1
        elif verdict.confidence < min_confidence:
            counts["below_min_confidence"] += 1
        else:
            a_won = verdict.winner == "a"
            rows.append({
                "prompt": record["prompt"],
                "chosen": record["response_a" if a_won else "response_b"],
                "rejected": record["response_b" if a_won else "response_a"],
                "confidence": verdict.confidence,
                "chosen_prob_first": verdict.prob_a_first if a_won else verdict.prob_b_first,
                "chosen_prob_second": verdict.prob_a_second if a_won else 1.0 - verdict.prob_a_first,
                "winner": verdict.winner,
            })
    counts["kept"] = len(rows)
    return rows, counts


def win_rate(verdicts: Sequence[Verdict | None]) -> dict[str, Any]:
    """Wins of a, of b, ties; the win-rate of a (ties half) with its 95% Wilson interval; the mean
    probability that a wins. Comparisons the judge could not read (too long) are counted apart."""
    judged = [v for v in verdicts if v is not None]
    wins_a = sum(v.winner == "a" for v in judged)
    ties = sum(v.winner == "tie" for v in judged)
    n = len(judged)
    low, high = wilson_interval(wins_a + ties / 2, n)
    return {"comparisons": n, "wins_a": wins_a, "wins_b": n - wins_a - ties, "ties": ties,
            "win_rate_a": (wins_a + ties / 2) / n, "ci95": [low, high],
            "ci_method": "Wilson score interval, ties counted as half a win",
            "mean_prob_a": sum(v.prob_a for v in judged) / n,
            # The judge's mean probability of preferring whichever response it sees first: 0.5 = no position bias.
            "first_position_preference": sum(v.prob_a_first + v.prob_b_first for v in judged) / (2 * n),
            "too_long": len(verdicts) - n}


def answers(model: LoadedModel, prompts: Sequence[str], gen: GenerateConfig, batch_size: int,
            what: str) -> list[str]:
    """The model's responses to `prompts`, chat-rendered when its tokenizer carries a chat template."""
    if model.config.model.arch != "decoder":
        raise JaxllmError(f"{what} must be a decoder that writes responses; it is a model.arch="
                          f"{model.config.model.arch}")
    chat = model.tokenizer.chat_template is not None
    texts: list[str] = []
    with tqdm(total=len(prompts), desc=what, unit="prompt", dynamic_ncols=True,
              disable=jax.process_index() != 0) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            texts += generate_text(model.graphdef, model.params, model.config, model.tokenizer, batch, gen, chat=chat)
            bar.update(len(batch))
    return texts


def revise(reviser: LoadedModel, records: Sequence[dict], principle: str, gen: GenerateConfig,
           batch_size: int) -> tuple[list[dict], dict[str, int]]:
    """Critique-and-revise: for each record (prompt + response) the reviser's critique by `principle`, then its
    rewrite; rows prompt / chosen (the revision) / rejected (the original) / critique / principle. Revisions
    that are empty or the original unchanged are dropped and counted."""
    asks = [CRITIQUE_TEMPLATE.format(principle=principle, prompt=r["prompt"], response=r["response"]) for r in records]
    critiques = answers(reviser, asks, gen, batch_size, "critiquing")
    asks = [REVISE_TEMPLATE.format(principle=principle, prompt=r["prompt"], response=r["response"], critique=c)
            for r, c in zip(records, critiques)]
    revisions = answers(reviser, asks, gen, batch_size, "revising")
    rows, unchanged = [], 0
    for record, critique, revision in zip(records, critiques, revisions):
        if not revision.strip() or revision.strip() == record["response"].strip():
            unchanged += 1
            continue
        rows.append({"prompt": record["prompt"], "chosen": revision, "rejected": record["response"],
                     "critique": critique, "principle": principle})
    return rows, {"pairs": len(records), "kept": len(rows), "unchanged": unchanged}


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """The rows as jsonl, written atomically by process 0."""
    if jax.process_index() == 0:
        atomic_write_text(Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def run(args, gen: GenerateConfig) -> int:
    """The `jaxllm judge` command (cli.py's arguments)."""
    labelling, comparing = args.data is not None, args.prompts is not None
    if labelling == comparing:
        raise JaxllmError("give --data IN.jsonl (label pairs, or --revise them) or --prompts FILE with --model-a and "
                          "--model-b (a win-rate), not both")
    if args.revise and not labelling:
        raise JaxllmError("--revise rewrites the responses of --data IN.jsonl (prompt + response records)")
    if args.revise and not args.principle:
        raise JaxllmError("--revise needs --principle \"...\": the rule the critique and the rewrite follow")
    if labelling and not args.out:
        raise JaxllmError("--data needs --out OUT.jsonl, the preference dataset to write")
    if comparing and not (args.model_a and args.model_b):
        raise JaxllmError("--prompts needs --model-a RUN_A and --model-b RUN_B, the models to compare")
    if not comparing and (args.model_a or args.model_b or args.report):
        raise JaxllmError("--model-a, --model-b and --report go with --prompts FILE (a win-rate)")
    if not 0.5 <= args.min_confidence <= 1.0:
        raise JaxllmError(f"--min-confidence is a probability in [0.5, 1] (the judge's confidence), "
                          f"got {args.min_confidence}")
    if args.batch_size < 1:
        raise JaxllmError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.revise:
        records = read_jsonl(args.data, ["prompt", "response"])
        reviser = open_model(args.reviser or args.judge, tokenizer=args.tokenizer)
        rows, counts = revise(reviser, records, args.principle, gen, args.batch_size)
        write_jsonl(args.out, rows)
        _say(f"wrote {counts['kept']} revised pairs of {counts['pairs']} to {args.out} "
             f"({counts['unchanged']} revisions empty or unchanged, dropped)")
        return 0
    template = load_template(args.template)
    labels = [label.strip() for label in args.labels.split(",")]
    if comparing:
        prompts = read_prompts(args.prompts)
        where = [Path(open_pretrained(path).where).resolve() for path in (args.model_a, args.model_b)]
        if where[0] == where[1]:  # a run directory and its newest checkpoint are one model too
            raise JaxllmError(f"--model-a and --model-b are the same model ({args.model_a}); a win-rate compares "
                              "two different runs or checkpoints")
        responses = {}
        for name, path in (("a", args.model_a), ("b", args.model_b)):
            responses[name] = answers(open_model(path, tokenizer=args.tokenizer), prompts, gen, args.batch_size,
                                      f"model {name.upper()}")
        records = [{"prompt": p, "response_a": a, "response_b": b}
                   for p, a, b in zip(prompts, responses["a"], responses["b"])]
    else:
        records = read_jsonl(args.data, ["prompt", "response_a", "response_b"], conversations=True)
    judge = Judge(open_model(args.judge, tokenizer=args.tokenizer), template, labels, args.batch_size)
    verdicts = judge.compare([tuple(shown(r[k]) for k in ("prompt", "response_a", "response_b")) for r in records])
    rows, counts = preference_rows(records, verdicts, args.min_confidence)
    if args.out:
        write_jsonl(args.out, rows)
        _say(f"wrote {counts['kept']} preference pairs of {counts['pairs']} to {args.out} ({counts['ties']} ties, "
             f"{counts['below_min_confidence']} below --min-confidence {args.min_confidence}, "
             f"{counts['too_long']} longer than the judge's context: dropped)")
    labelled = [v for r, v in zip(records, verdicts) if "chosen" in r and v is not None]
    if labelled:
        agree = win_rate(labelled)
        low, high = agree["ci95"]
        _say(f"the judge agrees with the given chosen/rejected labels on {agree['wins_a']} of {agree['comparisons']} "
             f"pairs, {agree['ties']} ties: {agree['win_rate_a']:.3f} (95% CI {low:.3f} to {high:.3f}; ties half)")
    if comparing:
        if all(v is None for v in verdicts):
            raise JaxllmError("no comparison fits the judge's context; shorten the prompts, ask for fewer new "
                              "tokens (--max-new-tokens), or use a shorter --template")
        report = {"model_a": args.model_a, "model_b": args.model_b, "judge": args.judge,
                  "template": args.template or "default", "labels": labels, **win_rate(verdicts)}
        if args.report and jax.process_index() == 0:
            atomic_write_text(Path(args.report), json.dumps(report, indent=2) + "\n")
        low, high = report["ci95"]
        _say(f"win-rate of A over B: {report['win_rate_a']:.3f} (95% CI {low:.3f} to {high:.3f}; {report['wins_a']} "
             f"wins, {report['wins_b']} losses, {report['ties']} ties of {report['comparisons']} prompts"
             + (f"; {report['too_long']} too long for the judge" if report["too_long"] else "") + ")")
    return 0


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
