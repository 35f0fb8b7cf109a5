"""Language identification with py3langid (langid.py's naive Bayes model, shipped inside the package: nothing
is downloaded). The score is py3langid's normalised probability (`norm_probs=True`) of the best language.

FineWeb keeps English documents whose fastText score is >= 0.65 (datatrove `LanguageFilter`); py3langid's
probabilities are calibrated differently (length-tempered softmax), so 0.65 is a starting point, not an
equivalent: see docs/data.md "Cleaning" for the scores measured on the bundled corpus.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxllm.config import ConfigError, JaxllmError


@dataclass
class LanguageConfig:
    enabled: bool = True
    languages: Optional[list[str]] = field(default_factory=lambda: ["en"])  # null: keep every language
    min_language_score: Any = 0.65  # a probability, or {lang: probability} per language (others: 0.65)
    keep_fields: bool = True  # write `language` and `language_score` into kept documents


@functools.lru_cache(maxsize=1)
def _identifier():
    """py3langid's model, loaded once per process (seconds; read-only afterwards)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise JaxllmError("language identification needs py3langid: pip install -e '.[data]'") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageId:
    """`__call__(text) -> (lang, score, reason)`: reason "language:<lang>" for a language not in `languages`,
    "language:<lang>_low_score" for one below its threshold, else None."""

    def __init__(self, config: LanguageConfig):
        self.languages = None if config.languages is None else {str(x) for x in config.languages}
        default, per_language = 0.65, {}
        if isinstance(config.min_language_score, dict):
            per_language = {str(k): v for k, v in config.min_language_score.items()}
        else:
            default = config.min_language_score
        for where, value in [("", default), *((f".{k}", v) for k, v in per_language.items())]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"clean.language.min_language_score{where} must be a probability in [0, 1] "
                                  f"(e.g. 0.65), got {value!r}")
        self.default, self.per_language = float(default), {k: float(v) for k, v in per_language.items()}
        self._identifier = self._load()  # checks the language codes now, not in a worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_identifier": None}

    def _load(self):
        identifier = _identifier()
        unknown = sorted((self.languages or set()) - set(identifier.labels))
        if unknown:
            raise ConfigError(f"clean.language.languages: py3langid does not know {', '.join(unknown)}; use ISO "
                              f"639-1 codes such as en, fr, de (it knows {len(identifier.labels)})")
        return identifier

    def __call__(self, text: str) -> tuple[str, float, Optional[str]]:
        if self._identifier is None:
            self._identifier = self._load()
        lang, score = self._identifier.classify(text)
        if self.languages is not None and lang not in self.languages:
            return lang, score, f"language:{lang}"
        if score < self.per_language.get(lang, self.default):
            return lang, score, f"language:{lang}_low_score"
        return lang, score, None
