"""The clean stage on hand-made documents: each rule of each filter drops a document made to break it (with
the filter's other rules at their published thresholds) and keeps a clean one; normalisation, language ID,
PII scrubbing with counts; the `jaxllm data clean` command end to end."""

from __future__ import annotations

import gzip
import json
import pickle

import pytest

from jaxllm.config import ConfigError
from jaxllm.dataprep.clean import COUNTS_FIELD, Cleaner, normalize_text, NormalizeConfig

LINES = [
    "The river runs past the old mill and into the valley below the town.",
    "Farmers bring their grain to the market on the first day of each week.",
    "Children play in the square while their parents talk with the merchants.",
    "A small bridge of grey stone crosses the water near the church.",
    "In the evening the lamps are lit and the streets grow quiet again.",
    "Travellers who stay at the inn often praise the bread and the soup.",
    "The mayor has promised to repair the road that leads to the hills.",
    "Most of the houses have gardens with apple trees and rows of beans.",
]
CLEAN = "\n".join(LINES)
FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
LONG_WORDS = ["incomprehensibilities", "counterrevolutionaries", "institutionalisation", "electroencephalograph",
              "uncharacteristically", "interdisciplinarity", "misinterpretations", "disproportionately"]
ANIMALS = ["dog", "cat", "horse", "goat", "sheep", "duck", "goose", "mule"]


def only(name: str | None, **settings) -> dict:
    """A clean config with only filter `name` on (None: no quality filter), no language ID or PII."""
    config = {f: {"enabled": f == name} for f in FILTERS}
    config["language"] = {"enabled": False}
    config["pii"] = {"enabled": False}
    if name is not None:
        config[name].update(settings)
    return config


def run(config: dict, text: str):
    return Cleaner(config)({"id": "doc-1", "text": text, "source": "test"})


BROKEN = [  # (filter, settings, document, reason)
    ("gopher_quality", {}, "The cat sat on the mat and that was all there was to it.", "min_doc_words"),
    ("gopher_quality", {}, "\n".join([CLEAN] * 1000), "max_doc_words"),  # 104,000 words
    ("gopher_quality", {}, " ".join(["to be or not to be it is so"] * 7) + ".", "min_avg_word_length"),
    ("gopher_quality", {}, " ".join(LONG_WORDS * 8) + " the and of.", "max_avg_word_length"),
    ("gopher_quality", {}, CLEAN + "\n" + " ".join(f"#news{i}" for i in range(20)) + ".", "hash_word_ratio"),
    ("gopher_quality", {}, CLEAN + "\nand " + " and ".join(["..."] * 20) + " end.", "ellipsis_word_ratio"),
    ("gopher_quality", {}, "\n".join("- " + line for line in LINES), "max_bullet_lines_ratio"),
    ("gopher_quality", {}, "\n".join(line[:-1] + "..." if i % 2 else line for i, line in enumerate(LINES)),
     "max_ellipsis_lines_ratio"),
    ("gopher_quality", {}, CLEAN + "\n" + " ".join(str(10 + i) for i in range(40)) + ".", "min_alpha_words_ratio"),
    ("gopher_quality", {}, "\n".join(line.replace("the ", "a ").replace("The ", "A ").replace(" and ", " plus ")
                                     .replace(" of ", " from ").replace(" to ", " toward ").replace(" with ", " beside ")
                                     .replace(" that ", " which ").replace(" have ", " own ") for line in LINES),
     "min_stop_words"),
    ("gopher_repetition", {}, "\n\n".join(LINES + LINES[:4]), "dup_para_frac"),
    ("gopher_repetition", {}, "\n\n".join(LINES + [" ".join(LINES[:3])] * 2), "dup_para_char_frac"),
    ("gopher_repetition", {}, "\n".join(LINES + LINES[:4]), "dup_line_frac"),
    ("gopher_repetition", {}, "\n".join(LINES + [" ".join(LINES[:3])] * 2), "dup_line_char_frac"),
    ("gopher_repetition", {}, " ".join(f"{w} green apple" for w in LONG_WORDS) + ".", "top_2_gram"),
    *[("gopher_repetition", {"top_n_grams": {n: 0.18}}, " ".join(f"{w} of the green apple" for w in LONG_WORDS) + ".",
       f"top_{n}_gram") for n in (3, 4)],
    *[("gopher_repetition", {"top_n_grams": {}, "dup_n_grams": {n: frac}},
       CLEAN + "\n" + " ".join([" ".join(LINES[0].split()[:n])] * 10) + ".", f"duplicated_{n}_n_grams")
      for n, frac in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))],
    ("c4", {}, CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("c4", {}, CLEAN + "\nThe function returns {a: 1} on success.", "curly_bracket"),
    ("c4", {}, "\n".join(LINES[:4]), "min_num_sentences"),
    ("c4", {}, "\n".join(line[:-1] for line in LINES), "min_num_sentences"),  # every line goes: no sentence left
    ("fineweb", {}, "\n".join(line[:-1] for line in LINES), "line_punct_thr"),
    ("fineweb", {}, "\n".join(f"The {w} sleeps." for w in ANIMALS) + "\n" + CLEAN[:200], "short_line_thr"),
    ("fineweb", {}, CLEAN + "\n" + LINES[0], "char_duplicates_ratio"),
    ("fineweb", {}, "\n".join(f"{w} {v}." for w in LONG_WORDS for v in ("notwithstanding", "nevertheless")),
     "new_line_ratio"),  # 15 newlines, 48 words
]


@pytest.mark.parametrize("name,settings,text,rule", BROKEN, ids=[f"{b[0]}:{b[3]}" for b in BROKEN])
def test_each_rule_drops_the_document_made_to_break_it(name, settings, text, rule):
    assert run(only(name, **settings), text) == (None, f"{name}:{rule}")
    assert run(only(name, **settings), CLEAN)[1] is None, "the clean document passes the same settings"


@pytest.mark.parametrize("name", FILTERS)
def test_a_rule_set_to_null_is_off(name):
    rule = {"gopher_quality": "min_doc_words", "gopher_repetition": "dup_line_frac", "c4": "min_num_sentences",
            "fineweb": "line_punct_thr"}[name]
    text = {"gopher_quality": "Too short to keep with the rule on, is it not?", "c4": LINES[0],
            "gopher_repetition": "\n".join(LINES + ["Yes."] * 6), "fineweb": "\n".join(line[:-1] for line in LINES)}[name]
    assert run(only(name), text)[1] == f"{name}:{rule}"
    assert run(only(name, **{rule: None}), text)[1] is None


def test_the_clean_document_passes_every_default_filter_and_keeps_its_fields():
    doc, reason = Cleaner()({"id": "doc-1", "text": CLEAN, "source": "test"})
    assert reason is None
    assert doc["text"] == CLEAN and doc["id"] == "doc-1" and doc["source"] == "test"
    assert doc["language"] == "en" and doc["language_score"] > 0.9
    assert COUNTS_FIELD not in doc  # nothing changed, nothing counted


def test_c4_line_rules_remove_lines_and_count_them():
    junk = ["Click here to continue", "Hi there.", "Please enable JavaScript to view this page.",
            "Read our privacy policy before you continue.", "See " + "x" * 1001 + " for more.",
            "The mill was built in the year of the flood.[1]"]
    doc, reason = run(only("c4"), "\n".join(LINES + junk))
    assert reason is None
    assert doc["text"] == "\n".join(LINES + ["The mill was built in the year of the flood."])  # citation removed
    assert doc[COUNTS_FIELD] == {"c4:line_no_terminal_punct": 1, "c4:line_min_words": 1, "c4:line_javascript": 1,
                                 "c4:line_policy": 1, "c4:line_max_word_length": 1}


def test_normalisation():
    config = NormalizeConfig()
    assert normalize_text("Cafe\u0301 \t au\u00a0lait\r\n\x00\u200b\n\n\n\nnext   line  ", config) == \
        "Caf\u00e9 au lait\n\nnext line"
    assert normalize_text("\ufb01ne \uff21", NormalizeConfig(form="NFKC")) == "fine A"
    assert normalize_text("\ufb01ne", config) == "\ufb01ne"  # NFC keeps compatibility forms
    doc, _ = run(only(None), CLEAN.replace("\n", "  \n"))
    assert doc["text"] == CLEAN and doc[COUNTS_FIELD] == {"normalize:changed": 1}
    assert run(only(None), " \x00\n\t ") == (None, "normalize:empty")
    with pytest.raises(ConfigError, match="clean.normalize.form must be one of NFC, NFKC"):
        Cleaner({"normalize": {"form": "NFD"}})


FRENCH = ("Au commencement, Dieu créa les cieux et la terre. La terre était informe et vide: il y avait des "
          "ténèbres à la surface de l'abîme, et l'esprit de Dieu se mouvait au-dessus des eaux.")


def test_language_id_keeps_english_drops_french_and_applies_thresholds():
    config = only(None)
    config["language"] = {"languages": ["en"], "min_language_score": 0.65}
    doc, reason = run(config, CLEAN)
    assert reason is None and doc["language"] == "en" and doc["language_score"] >= 0.65
    assert run(config, FRENCH) == (None, "language:fr")
    config["language"] = {"languages": ["en", "fr"], "min_language_score": {"fr": 0.5}, "keep_fields": False}
    doc, reason = run(config, FRENCH)
    assert reason is None and "language" not in doc
    config["language"] = {"languages": ["en"], "min_language_score": 0.65}
    assert run(config, "The house is red.")[0]["language_score"] == pytest.approx(0.7505, abs=1e-4)
    config["language"] = {"languages": ["en"], "min_language_score": {"en": 0.8}}
    assert run(config, "The house is red.") == (None, "language:en_low_score")
    with pytest.raises(ConfigError, match="py3langid does not know xx"):
        Cleaner({"language": {"languages": ["xx"]}})
    with pytest.raises(ConfigError, match=r"min_language_score.en must be a probability"):
        Cleaner({"language": {"min_language_score": {"en": 2}}})


def test_pii_is_replaced_and_counted():
    config = only(None)
    config["pii"] = {"patterns": {"account": r"\bACCT-\d{6}\b", "case": {"regex": r"No\. \d+/\d+", "replacement": "[CASE]"}}}
    text = ("Write to jane.doe@example.org or call +1 (555) 123-4567 or 555.987.6543; the server 8.8.4.4 and "
            "2001:4860:4860::8888 answer, the router 192.168.1.1 and ::1 are private. Account ACCT-123456, "
            "case No. 12/2024, verse 3:16, on 2024-01-15.")
    doc, reason = run(config, text)
    assert reason is None
    assert doc["text"] == ("Write to email@example.com or call <PHONE> or <PHONE>; the server 22.214.171.124 and "
                           "2001:db8::1 answer, the router 192.168.1.1 and ::1 are private. Account <ACCOUNT>, "
                           "case [CASE], verse 3:16, on 2024-01-15.")
    assert doc[COUNTS_FIELD] == {"pii:email": 1, "pii:phone": 2, "pii:ipv4": 1, "pii:ipv6": 1, "pii:account": 1,
                                 "pii:case": 1}
    config["pii"] = {"only_public_ips": False, "email": False, "phone": False}
    doc, _ = run(config, text)
    assert doc[COUNTS_FIELD] == {"pii:ipv4": 2, "pii:ipv6": 2}
    with pytest.raises(ConfigError, match="clean.pii.patterns.bad: invalid regex"):
        Cleaner({"pii": {"patterns": {"bad": "(unclosed"}}})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'clean.gopher_quality.min_words'; did you mean"):
        Cleaner({"gopher_quality": {"min_words": 3}})
    with pytest.raises(ConfigError, match="clean.gopher_repetition.top_n_grams must be a mapping"):
        Cleaner({"gopher_repetition": {"top_n_grams": [2, 0.2]}})


def test_the_cleaner_pickles_and_gives_the_same_verdicts():
    cleaner = Cleaner()
    docs = [{"text": t} for t in (CLEAN, FRENCH, "\n".join(LINES + LINES[:4]), CLEAN + "\nMail me at a@b.com.")]
    before = [cleaner(d) for d in docs]
    assert [cleaner(d) for d in docs] == before
    assert [pickle.loads(pickle.dumps(cleaner))(d) for d in docs] == before


def test_jaxllm_data_clean_writes_outputs_stats_and_rejected_samples(tmp_path, capsys):
    from jaxllm.cli import main
    from jaxllm.dataprep.engine import reason_file

    docs = [{"id": "kept-1", "text": CLEAN, "year": 1},
            {"id": "french", "text": FRENCH + "\n" + FRENCH.upper()},
            {"id": "repeats", "text": "\n".join(LINES + LINES[:4])},
            {"id": "kept-2", "text": CLEAN + "\nWrite to jane@example.org or 8.8.4.4 for help."}]
    corpus = tmp_path / "in" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:2]) + "{not json\n"
                      + "".join(json.dumps(d) + "\n" for d in docs[2:]))
    out = tmp_path / "out"
    assert main(["data", "clean", "--input", str(corpus), "--output", str(out), "--workers", "1",
                 "--samples-per-reason", "1", "c4.enabled=false"]) == 0
    assert "4 documents in, 2 out" in capsys.readouterr().out
    with gzip.open(out / "part-00000.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f]
    assert [d["id"] for d in kept] == ["kept-1", "kept-2"]
    assert kept[0] == {**docs[0], "language": "en", "language_score": kept[0]["language_score"]}
    assert kept[1]["text"].endswith("Write to email@example.com or 22.214.171.124 for help.")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents_in"] == 4 and stats["documents_out"] == 2 and stats["bad_records"] == 1
    assert stats["dropped"] == {"language:fr": 1, "gopher_repetition:dup_line_frac": 1}
    assert stats["counts"] == {"pii:email": 1, "pii:ipv4": 1}
    with gzip.open(out / "rejected" / reason_file("language:fr"), "rt") as f:
        assert [json.loads(line)["id"] for line in f] == ["french"]
    assert main(["data", "clean", "--input", str(corpus), "--output", str(out / "x"), "gopher_quality.min_words=1"]) == 2
    assert "unknown config key 'clean.gopher_quality.min_words'" in capsys.readouterr().err
    assert main(["data", "clean", "--input", str(corpus), "--output", str(out / "y"), "--pipeline-arg=--project=p"]) == 2
    assert "--pipeline-arg is for Beam runners" in capsys.readouterr().err
