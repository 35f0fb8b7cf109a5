"""The decontaminate stage: a 13-gram of an evaluation set inside a longer document is found (through case and
punctuation differences), a 12-gram is not; drop and flag modes; evaluation sets from files and from a local
lm-evaluation-harness task."""

from __future__ import annotations

import gzip
import json
import pickle

import pytest

from jaxllm.config import ConfigError, JaxllmError
from jaxllm.dataprep.decontaminate import Decontaminator, ngram_hashes, normalized_words

EVAL = ("Then the king commanded that the seven golden lamps be carried through the eastern gate at "
        "dawn, and the people followed them singing.")
WORDS = EVAL.split()
FILLER = "Our village keeps a calendar of feasts and markets that everyone can read at the well. "


def eval_files(tmp_path):
    jsonl = tmp_path / "bench.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write(json.dumps({"question": "q", "text": EVAL}) + "\n")
        f.write(json.dumps({"question": "q2", "text": "A short one."}) + "\n")
    text = tmp_path / "other.txt"
    text.write_text("Seven plus five equals twelve, and twelve plus one equals thirteen, said the teacher to "
                    "the class on Monday morning.\n")
    return [str(jsonl), str(text)]


def test_normalisation_is_lowercase_without_punctuation():
    assert normalized_words("The KING's “seven” lamps—at dawn; don't!") == ["the", "kings", "seven", "lampsat",
                                                                            "dawn", "dont"]
    assert len(list(ngram_hashes(EVAL, 13))) == len(WORDS) - 12
    assert list(ngram_hashes("one two", 13)) == []


def test_a_13_gram_inside_a_longer_document_is_found_and_a_12_gram_is_not(tmp_path):
    stage = Decontaminator({"files": eval_files(tmp_path)})
    assert stage.sets == ["bench.jsonl.gz", "other.txt"]
    # 13 consecutive evaluation words, changed in case and punctuation, in the middle of unrelated text
    thirteen = " ".join(WORDS[3:16]).upper().replace(",", ";")
    doc = {"id": "d1", "text": FILLER * 3 + thirteen + " " + FILLER * 3}
    assert stage(doc) == (None, "decontaminate:bench.jsonl.gz")
    twelve = {"id": "d2", "text": FILLER * 3 + " ".join(WORDS[3:15]) + " " + FILLER * 3}
    assert stage(twelve) == (twelve, None)
    # splitting the 13 words with another word breaks the match
    split = {"id": "d3", "text": " ".join(WORDS[3:9] + ["indeed"] + WORDS[9:16])}
    assert stage(split) == (split, None)
    assert stage({"text": "x " + "Seven plus five equals twelve and twelve plus one equals thirteen said the"}) == \
        (None, "decontaminate:other.txt")


def test_flag_mode_keeps_the_document_with_counts_and_sets(tmp_path):
    stage = Decontaminator({"files": eval_files(tmp_path), "mode": "flag"})
    doc = {"id": "d1", "text": EVAL + " " + FILLER + "Seven plus five equals twelve, and twelve plus one equals "
                                                      "thirteen, said the teacher."}
    out, reason = stage(doc)
    assert reason is None
    assert out == {**doc, "contaminated": True, "contamination_ngrams": len(WORDS) - 12 + 2,
                   "contamination_sets": ["bench.jsonl.gz", "other.txt"]}
    clean, _ = stage({"id": "d2", "text": FILLER})
    assert clean["contaminated"] is False and clean["contamination_ngrams"] == 0 and clean["contamination_sets"] == []
    # n is configurable; the stage pickles (sent to worker processes) and answers the same
    short = Decontaminator({"files": eval_files(tmp_path), "n": 3})
    assert short({"text": "the seven golden"})[1] == "decontaminate:bench.jsonl.gz"
    assert pickle.loads(pickle.dumps(stage))(doc) == (out, None)


def test_harness_tasks_as_evaluation_sets(tmp_path):
    from tests.eval.harness_fixtures import task_dir

    tasks = task_dir(tmp_path / "tasks")
    stage = Decontaminator({"tasks": ["tiny_mc", "tiny_ppl"], "include_path": str(tasks), "n": 10})
    assert set(stage.sets) == {"tiny_mc", "tiny_ppl"}
    # tiny_mc: the question and its correct choice make the text ("...inherit the earth")
    assert stage({"text": "Blessed are the meek: for they shall inherit the earth."}) == (None, "decontaminate:tiny_mc")
    assert stage({"text": "Blessed are the meek: for they shall inherit the kingdom."})[1] is None
    assert stage({"text": "So God divided the light from the darkness. And God called"}) == \
        (None, "decontaminate:tiny_ppl")


def test_bad_evaluation_sets_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="decontaminate needs evaluation sets"):
        Decontaminator({})
    with pytest.raises(ConfigError, match="decontaminate.n must be >= 1"):
        Decontaminator({"files": eval_files(tmp_path), "n": 0})
    with pytest.raises(ConfigError, match="decontaminate.mode must be one of drop, flag"):
        Decontaminator({"files": eval_files(tmp_path), "mode": "remove"})
    with pytest.raises(JaxllmError, match="missing.jsonl.*give existing jsonl or text files"):
        Decontaminator({"files": [str(tmp_path / "missing.jsonl")]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(JaxllmError, match=r"bad.jsonl:2: no 'text' field"):
        Decontaminator({"files": [str(bad)]})


def test_the_plan_changes_with_the_evaluation_ngrams(tmp_path):
    """The engine resumes a stage whose plan (the stage's `config`) is unchanged: editing an evaluation file
    must change it."""
    files = eval_files(tmp_path)
    before = Decontaminator({"files": files}).config
    assert before == Decontaminator({"files": files}).config
    assert before["n"] == 13 and before["sets"] == ["bench.jsonl.gz", "other.txt"]
    (tmp_path / "other.txt").write_text("A different evaluation text of more than thirteen words, so that its "
                                        "n-grams differ from the old ones.\n")
    assert Decontaminator({"files": files}).config["ngrams_sha256"] != before["ngrams_sha256"]
