"""The published heuristic quality filters, run through datatrove's own implementations.

datatrove (the library behind FineWeb) implements the Gopher quality and repetition rules (Rae et al. 2021,
arXiv:2112.11446, section A.1.1 and table A1), C4's line and document rules (Raffel et al. 2020, section
2.2; TFDS `c4_utils.py`) and FineWeb's own rules (Penedo et al. 2024). We call those classes
(`datatrove/pipeline/filters/{gopher_quality,gopher_repetition,c4,fineweb_quality}_filter.py`, datatrove
0.10.1) with their published default thresholds, so a verdict here is datatrove's verdict.

One substitution: datatrove's English word tokenizer is spaCy's (`SpaCyTokenizer("en")`), which is an
extra dependency, and its NLTK alternative needs the `punkt` data downloaded. We pass datatrove a
`WordTokenizer` of ours instead (datatrove accepts one wherever it takes a language): words are runs of
letters/digits with inner apostrophes, and every punctuation mark is its own token (runs of dots and "…"
one token), which is how spaCy splits English; sentences are split by datatrove's own regex fallback
(`WhitespaceTokenizer.sent_tokenize`). Nothing is downloaded at run time.

Drop reasons are "<filter>:<rule>", the rule named after the threshold that decided it
(e.g. "gopher_quality:min_doc_words", "gopher_repetition:dup_line_frac", "c4:curly_bracket").
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxllm.config import ConfigError, JaxllmError

_WORD = re.compile(r"\w+(?:['’]\w+)*|\.{2,}|[^\w\s]")


def _datatrove():
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise JaxllmError("the quality filters need datatrove: pip install -e '.[data]'") from None


@functools.lru_cache(maxsize=None)
def word_tokenizer():
    """datatrove's `WordTokenizer` interface with our download-free word splitting (see the module doc)."""
    _datatrove()
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer

    class RegexWordTokenizer(WhitespaceTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return _WORD.findall(text)

    return RegexWordTokenizer()


# ---- configs: datatrove's defaults; null turns a rule off --------------------------------------------------

@dataclass
class GopherQualityConfig:
    """Gopher quality rules (arXiv:2112.11446 A.1.1; datatrove GopherQualityFilter)."""
    enabled: bool = True
    min_doc_words: Optional[int] = 50  # words (tokens with a non-punctuation character)
    max_doc_words: Optional[int] = 100000
    min_avg_word_length: Optional[float] = 3
    max_avg_word_length: Optional[float] = 10
    max_symbol_word_ratio: Optional[float] = 0.1  # "#" per word, and "..."/"…" per word
    max_bullet_lines_ratio: Optional[float] = 0.9  # lines starting with "•" or "-"
    max_ellipsis_lines_ratio: Optional[float] = 0.3  # lines ending with "..." or "…"
    min_alpha_words_ratio: Optional[float] = 0.8  # words with at least one letter
    min_stop_words: Optional[int] = 2  # of stop_words present
    stop_words: Optional[list[str]] = None  # default the, be, to, of, and, that, have, with


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (arXiv:2112.11446 table A1; datatrove GopherRepetitionFilter)."""
    enabled: bool = True
    dup_line_frac: Optional[float] = 0.3
    dup_para_frac: Optional[float] = 0.3
    dup_line_char_frac: Optional[float] = 0.2
    dup_para_char_frac: Optional[float] = 0.2
    top_n_grams: Any = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})  # n: max fraction of chars
    dup_n_grams: Any = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


@dataclass
class C4Config:
    """C4 rules (arXiv:1910.10683 section 2.2; datatrove C4QualityFilter). Line rules remove the line (counted
    as "c4:line_<rule>"); lorem ipsum, a curly bracket and too few sentences drop the document."""
    enabled: bool = True
    remove_citations: bool = True  # Wikipedia-style [1], [edit], [citation needed]
    filter_no_terminal_punct: bool = True  # keep lines ending in . ? ! " ' only (not "...")
    min_num_sentences: Optional[int] = 5  # sentences left after the line rules
    min_words_per_line: Optional[int] = 3
    max_word_length: Optional[int] = 1000  # a line with a longer word goes
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True  # lines mentioning javascript
    filter_curly_bracket: bool = True
    filter_policy: bool = True  # lines with "terms of use", "privacy policy", cookies...


@dataclass
class FineWebConfig:
    """FineWeb rules (arXiv:2406.17557 section 3.3; datatrove FineWebQualityFilter)."""
    enabled: bool = True
    line_punct_thr: Optional[float] = 0.12  # min fraction of lines ending in terminal punctuation
    line_punct_exclude_zero: bool = False
    short_line_thr: Optional[float] = 0.67  # max fraction of lines of <= short_line_length characters
    short_line_length: int = 30
    char_duplicates_ratio: Optional[float] = 0.01  # max fraction of characters in duplicated lines
    new_line_ratio: Optional[float] = 0.3  # max newlines per word ("list-like" documents)


_QUALITY_RULES = {  # datatrove's reason -> the threshold that decided it
    "gopher_short_doc": "min_doc_words", "gopher_long_doc": "max_doc_words",
    "gopher_below_avg_threshold": "min_avg_word_length", "gopher_above_avg_threshold": "max_avg_word_length",
    "gopher_too_many_hashes": "hash_word_ratio", "gopher_too_many_ellipsis": "ellipsis_word_ratio",
    "gopher_too_many_bullets": "max_bullet_lines_ratio", "gopher_too_many_end_ellipsis": "max_ellipsis_lines_ratio",
    "gopher_below_alpha_threshold": "min_alpha_words_ratio", "gopher_enough_stop_words": "min_stop_words",
}  # fmt: skip
_C4_RULES = {"too_few_sentences": "min_num_sentences"}
_C4_LINE_RULES = {
    "line-filter-too_long_word": "line_max_word_length", "line-filter-no_terminal_punc": "line_no_terminal_punct",
    "line-filter-too_few_words": "line_min_words", "line-filter-javascript": "line_javascript",
    "line-filter-policy": "line_policy",
}  # fmt: skip
_FINEWEB_RULES = {"line_punct_ratio": "line_punct_thr", "short_line_ratio": "short_line_thr",
                  "char_dup_ratio": "char_duplicates_ratio", "list_ratio": "new_line_ratio"}


def _ngram_table(value: Any, where: str) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping n: fraction (e.g. {{2: 0.2, 3: 0.18}}) or null, got {value!r}")
    table = []
    for n, frac in value.items():
        try:
            n, frac = int(n), float(frac)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {n!r}: {frac!r} must be an integer n >= 1 and a fraction") from None
        if n < 1 or not 0 <= frac <= 1:
            raise ConfigError(f"{where}: n={n} must be >= 1 and its fraction {frac} within [0, 1]")
        table.append((n, frac))
    return tuple(sorted(table))


class QualityFilters:
    """The enabled datatrove filters in FineWeb's order (repetition, quality, C4, FineWeb), built lazily so
    that the object pickles as its configs. `__call__(text) -> (text, reason, line_counts)`: C4 may remove lines,
    so the text that comes back can be shorter; `reason` is None when the document is kept."""

    def __init__(self, gopher_repetition: GopherRepetitionConfig, gopher_quality: GopherQualityConfig,
                 c4: C4Config, fineweb: FineWebConfig):
        self.configs = (gopher_repetition, gopher_quality, c4, fineweb)
        self._top = _ngram_table(gopher_repetition.top_n_grams, "clean.gopher_repetition.top_n_grams")
        self._dup = _ngram_table(gopher_repetition.dup_n_grams, "clean.gopher_repetition.dup_n_grams")
        self._filters: Optional[list] = None
        self._document: Any = None  # datatrove's Document class, once built

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filters": None, "_document": None}

    def _build(self) -> list:
        _datatrove()
        from datatrove.data import Document
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                                GopherRepetitionFilter)

        class CountingC4(C4QualityFilter):  # C4's line rules only update stats: count them per document
            lines: Counter  # set per document by __call__

            def stat_update(self, *labels, value: int = 1, unit: str | None = None):
                for label in labels:
                    if label in _C4_LINE_RULES:
                        self.lines["c4:" + _C4_LINE_RULES[label]] += value

        self._document = Document
        rep, qual, c4, fw = self.configs
        tok = word_tokenizer()
        filters = []
        if rep.enabled:
            filters.append(("gopher_repetition", {}, GopherRepetitionFilter(
                dup_line_frac=rep.dup_line_frac, dup_para_frac=rep.dup_para_frac,
                dup_line_char_frac=rep.dup_line_char_frac, dup_para_char_frac=rep.dup_para_char_frac,
                top_n_grams=self._top, dup_n_grams=self._dup, language=tok)))
        if qual.enabled:
            filters.append(("gopher_quality", _QUALITY_RULES, GopherQualityFilter(
                min_doc_words=qual.min_doc_words, max_doc_words=qual.max_doc_words,
                min_avg_word_length=qual.min_avg_word_length, max_avg_word_length=qual.max_avg_word_length,
                max_symbol_word_ratio=qual.max_symbol_word_ratio, max_bullet_lines_ratio=qual.max_bullet_lines_ratio,
                max_ellipsis_lines_ratio=qual.max_ellipsis_lines_ratio,
                max_non_alpha_words_ratio=qual.min_alpha_words_ratio, min_stop_words=qual.min_stop_words,
                stop_words=qual.stop_words, language=tok)))
        if c4.enabled:
            off = lambda v: -1 if v is None else v  # noqa: E731  (datatrove's "disabled")
            filters.append(("c4", _C4_RULES, CountingC4(
                remove_citations=c4.remove_citations, filter_no_terminal_punct=c4.filter_no_terminal_punct,
                min_num_sentences=off(c4.min_num_sentences), min_words_per_line=off(c4.min_words_per_line),
                max_word_length=off(c4.max_word_length), filter_lorem_ipsum=c4.filter_lorem_ipsum,
                filter_javascript=c4.filter_javascript, filter_curly_bracket=c4.filter_curly_bracket,
                filter_policy=c4.filter_policy, language=tok)))
        if fw.enabled:
            filters.append(("fineweb", _FINEWEB_RULES, FineWebQualityFilter(
                line_punct_thr=-1.0 if fw.line_punct_thr is None else fw.line_punct_thr,
                line_punct_exclude_zero=fw.line_punct_exclude_zero,
                short_line_thr=2.0 if fw.short_line_thr is None else fw.short_line_thr,
                short_line_length=fw.short_line_length,
                char_duplicates_ratio=2.0 if fw.char_duplicates_ratio is None else fw.char_duplicates_ratio,
                new_line_ratio=float("inf") if fw.new_line_ratio is None else fw.new_line_ratio, language=tok)))
        return filters

    def __call__(self, text: str) -> tuple[str, Optional[str], Counter]:
        if self._filters is None:
            self._filters = self._build()
        doc, lines = self._document(text=text, id=""), Counter()
        for name, rules, dt_filter in self._filters:
            if name == "c4":
                dt_filter.lines = lines
            verdict = dt_filter.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not keep:
                return doc.text, f"{name}:{rules.get(reason, reason)}", lines
            if not doc.text.strip():  # C4 removed every line and its sentence rule is off
                return doc.text, f"{name}:empty", lines
        return doc.text, None, lines
