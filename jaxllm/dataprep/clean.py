"""The clean stage: Unicode normalisation, language identification, the heuristic quality filters (Gopher
quality and repetition, C4, FineWeb: jaxllm.dataprep.filters) and PII scrubbing, as one `DocStage`.

Order (FineWeb's): normalise -> language -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> PII.
A dropped document's reason is "<filter>:<rule>" (e.g. "gopher_repetition:dup_line_frac", "language:fr").
Counters that are not drop reasons (C4 lines removed, PII replaced per kind, documents changed by
normalisation) travel in the kept document's `_counts` field ({name: int}), which the engine pops and sums
into stats.json's "counts".
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from jaxllm.config import ConfigError
from jaxllm.dataprep.engine import COUNTS_FIELD
from jaxllm.dataprep.filters import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, QualityFilters
from jaxllm.dataprep.langid import LanguageConfig, LanguageId
from jaxllm.dataprep.pii import PiiConfig, PiiScrubber

_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b\ufeff]")  # C0/C1 controls (not \t \n \v \f \r), ZWSP, BOM
_SPACES = re.compile(r"[^\S\n]+")  # every whitespace run other than newlines
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    enabled: bool = True
    form: Optional[Literal["NFC", "NFKC"]] = "NFC"  # NFKC also folds compatibility forms (ﬁ -> fi, full-width)
    control_chars: bool = True  # remove control characters (keeping tab/newline), zero-width spaces, BOMs
    whitespace: bool = True  # CRLF -> LF, runs of spaces/tabs -> one space, no spaces at line ends, <= 1 blank line


@dataclass
class CleanConfig:
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)


def clean_config(raw: dict[str, Any] | None) -> CleanConfig:
    """A CleanConfig from a YAML mapping (the `clean:` block), unknown keys and wrong types as ConfigErrors."""
    from jaxllm.config.loading import from_dict

    return from_dict(CleanConfig, raw, "clean")


def normalize_text(text: str, config: NormalizeConfig) -> str:
    if config.form:
        text = unicodedata.normalize(config.form, text)
    if config.whitespace:
        text = _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    if config.control_chars:
        text = _CONTROL.sub("", text)
    if config.whitespace:
        text = _BLANK_LINES.sub("\n\n", _LINE_EDGES.sub("\n", text)).strip()
    return text


class Cleaner:
    """The clean DocStage: `Cleaner(config)(doc) -> (doc, None) | (None, reason)`. `config` is a CleanConfig or
    the YAML mapping of one. Picklable (models and datatrove filters are rebuilt in each worker)."""

    name = "clean"

    def __init__(self, config: CleanConfig | dict | None = None, text_field: str = "text"):
        self.config = config if isinstance(config, CleanConfig) else clean_config(config)
        self.text_field = text_field
        c = self.config
        if c.normalize.form not in (None, "NFC", "NFKC"):
            raise ConfigError(f"clean.normalize.form must be NFC, NFKC or null, got {c.normalize.form!r}")
        self.language = LanguageId(c.language) if c.language.enabled else None
        self.filters = QualityFilters(c.gopher_repetition, c.gopher_quality, c.c4, c.fineweb)
        self.pii = PiiScrubber(c.pii) if c.pii.enabled else None

    def __call__(self, doc: dict) -> tuple[Optional[dict], Optional[str]]:
        c, text = self.config, doc[self.text_field]
        counts: Counter = Counter()
        if c.normalize.enabled:
            normalized = normalize_text(text, c.normalize)
            counts["normalize:changed"] += normalized != text
            text = normalized
        if not text.strip():
            return None, "normalize:empty"
        if self.language is not None:
            lang, score, reason = self.language(text)
            if reason:
                return None, reason
        text, reason, lines = self.filters(text)
        if reason:
            return None, reason
        counts.update(lines)
        if self.pii is not None:
            text, replaced = self.pii(text)
            counts.update(replaced)
        out = {**doc, self.text_field: text}
        if self.language is not None and c.language.keep_fields:
            out["language"], out["language_score"] = lang, round(score, 4)
        counts = {k: v for k, v in counts.items() if v}
        if counts:
            out[COUNTS_FIELD] = counts
        return out, None
