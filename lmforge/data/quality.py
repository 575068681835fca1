"""Model-based filters: quality classifier (DCLM/CS336 recipe), harmful-content classifiers.

- `train_quality(positives, negatives, out)`: reads two corpora (any `readers` format), holds out a
  slice for evaluation, trains the fastText-style classifier (`classifier.py`) with labels
  `hq`/`lq`, stores the positive-class scores of the whole pool (for percentile thresholds) and
  reports held-out accuracy.
- `quality_classifier` step: score each document (`meta["quality_score"]`); keep it if the score is
  ≥ `threshold`, or, with `keep_fraction`, if it is in the top fraction of the training pool.
- `harmful_classifier` step: the same classifier interface, dropping documents whose score for the
  harmful label is ≥ `threshold` (train it on your labelled data, e.g. Jigsaw, with
  `train_classifier`).
- `profanity` step: alt-profanity-check (a linear SVM that ships inside its wheel, loaded with
  joblib from the installed package, never from user files), dropping documents whose
  probability is ≥ `threshold`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Iterator

import numpy as np

from lmforge.data.pipeline import Filter, register
from lmforge.data.readers import expand_inputs, read_inputs
from lmforge.data.sources import Document
from lmforge.errors import ConfigError, DataError, require


def _texts(spec: list[str], limit: int) -> list[str]:
    out = []
    for doc in read_inputs(expand_inputs(spec)):
        if doc.text.strip():
            out.append(doc.text)
            if limit and len(out) >= limit:
                break
    return out


def train_quality(positives: list[str], negatives: list[str], out: str, cfg=None,
                  max_docs: int = 0, eval_fraction: float = 0.1, seed: int = 0) -> dict:
    """Train and save a hq/lq classifier (cfg: a `ClassifierConfig`); returns held-out accuracy."""
    from lmforge.data.classifier import train_classifier  # torch is imported only when needed

    pos, neg = _texts(positives, max_docs), _texts(negatives, max_docs)
    if not pos or not neg:
        raise DataError(f"train-quality needs documents on both sides (positives: {len(pos)}, "
                        f"negatives: {len(neg)})")
    examples = [(t, "hq") for t in pos] + [(t, "lq") for t in neg]
    random.Random(seed).shuffle(examples)
    n_eval = int(len(examples) * eval_fraction)
    held, train = examples[:n_eval], examples[n_eval:]
    model = train_classifier(train, cfg)
    acc = None
    if held:
        probs = model.score([t for t, _ in held], "hq")
        acc = float(np.mean([(p >= 0.5) == (lab == "hq") for p, (_, lab) in zip(probs, held)]))
    model.reference_scores = [round(float(s), 6) for s in model.score([t for t, _ in examples], "hq")]
    model.save(out)
    return {"positives": len(pos), "negatives": len(neg), "train": len(train), "held_out": len(held),
            "held_out_accuracy": acc}


class _ClassifierFilter(Filter):
    @dataclasses.dataclass
    class Config:
        model: str = ""
        label: str = "hq"
        threshold: float = 0.5
        keep_fraction: float | None = None
        batch_size: int = 64

    score_key = "score"

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        if not self.cfg.model:
            raise ConfigError(f"{self.label}: 'model' (a classifier directory or .bin/.ftz file) is required")
        from lmforge.data.classifier import load_classifier

        self.model = load_classifier(self.cfg.model)
        self.threshold = self.cfg.threshold
        if self.cfg.keep_fraction is not None:
            if not 0 < self.cfg.keep_fraction <= 1:
                raise ConfigError(f"{self.label}: keep_fraction must be in (0, 1], got {self.cfg.keep_fraction}")
            self.threshold = self.model.percentile_threshold(self.cfg.keep_fraction)

    def keep(self, score: float) -> bool:
        raise NotImplementedError

    def run(self, docs: Iterator[Document], rank: int = 0, world: int = 1) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.cfg.batch_size:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def _flush(self, batch: list[Document]) -> Iterator[Document]:
        if not batch:
            return
        t0 = time.perf_counter()
        scores = self.model.score([d.text for d in batch], self.cfg.label)
        self.stats.seconds += time.perf_counter() - t0
        for doc, s in zip(batch, scores):
            doc.meta[self.score_key] = round(float(s), 4)
        yield from super().run(iter(batch))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return True if self.keep(doc.meta[self.score_key]) else (False, self.reason)


@register("quality_classifier")
class QualityClassifier(_ClassifierFilter):
    score_key, reason = "quality_score", "low_quality_score"

    def keep(self, score: float) -> bool:
        return score >= self.threshold


@register("harmful_classifier")
class HarmfulClassifier(_ClassifierFilter):
    score_key, reason = "harmful_score", "harmful"

    @dataclasses.dataclass
    class Config(_ClassifierFilter.Config):
        label: str = "toxic"

    def keep(self, score: float) -> bool:
        return score < self.threshold


@functools.cache
def _profanity():
    return require("profanity_check", "profanity scoring", extra="data", package="alt-profanity-check")


def profanity_scores(texts: list[str]) -> np.ndarray:
    return np.asarray(_profanity().predict_prob(texts), dtype=np.float64)


@register("profanity")
class ProfanityFilter(Filter):
    """Drop documents that alt-profanity-check scores ≥ threshold (score kept in meta)."""

    @dataclasses.dataclass
    class Config:
        threshold: float = 0.9

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        _profanity()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = float(profanity_scores([doc.text])[0])
        doc.meta["profanity_score"] = round(score, 4)
        return True if score < self.cfg.threshold else (False, "profanity")
