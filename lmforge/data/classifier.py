"""A fastText-style text classifier, written here in PyTorch: train, save, load, score.

The model of Joulin et al. 2017 ("Bag of Tricks for Efficient Text Classification"): the mean of
embeddings of the document's words and word bigrams (hashed into `buckets` rows) feeds a linear
softmax layer. Trained with SGD and a learning rate that decays linearly to zero, as fastText does;
input embeddings start uniform in ±1/dim and the output layer at zero (fastText's init).

Used for model-based quality filtering (DCLM/CS336: positives = high-quality reference text,
negatives = random crawl) and for harmful-content classifiers trained on the user's labelled
data (e.g. Jigsaw). Saved as a directory: `model.safetensors` + `classifier.json` (labels,
hyper-parameters, and the positive-class scores of the training pool, for percentile thresholds).

`load_classifier` also opens real fastText `.bin`/`.ftz` files (such as DCLM's released quality
model) through the `fasttext-predict` wheel; training those needs the fastText binary, not here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.data.dedup import hash64
from lmforge.errors import DataError, require
from lmforge.io import atomic_dir, read_json

FORMAT = "lmforge.fasttext"


@dataclasses.dataclass
class ClassifierConfig:
    dim: int = 32
    buckets: int = 1 << 18
    word_ngrams: int = 2
    epochs: int = 5
    lr: float = 0.5
    batch_size: int = 16
    seed: int = 0


def features(text: str, buckets: int, word_ngrams: int = 2) -> list[int]:
    """Hashed ids of the lowercased words and word n-grams (n ≤ word_ngrams) of `text`."""
    words = text.lower().split()
    ids = [hash64(w) % buckets for w in words]
    for n in range(2, word_ngrams + 1):
        ids.extend(hash64(" ".join(words[i:i + n]), seed=n) % buckets for i in range(len(words) - n + 1))
    return ids or [0]


class FastTextClassifier(torch.nn.Module):
    def __init__(self, labels: Sequence[str], cfg: ClassifierConfig | None = None):
        super().__init__()
        self.cfg = cfg or ClassifierConfig()
        self.labels = list(labels)
        self.embed = torch.nn.EmbeddingBag(self.cfg.buckets, self.cfg.dim, mode="mean", sparse=True)
        self.out = torch.nn.Linear(self.cfg.dim, len(self.labels), bias=False)
        self.reference_scores: list[float] = []
        with torch.no_grad():
            self.embed.weight.uniform_(-1.0 / self.cfg.dim, 1.0 / self.cfg.dim)
            self.out.weight.zero_()

    def _batch(self, texts: Sequence[str], feats: list[list[int]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if feats is None:
            feats = [features(t, self.cfg.buckets, self.cfg.word_ngrams) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        return torch.tensor([i for f in feats for i in f]), offsets

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids, offsets))

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(len(texts), len(labels)) class probabilities."""
        outs = []
        for i in range(0, len(texts), batch_size):
            ids, offsets = self._batch(texts[i:i + batch_size])
            outs.append(torch.softmax(self(ids, offsets), dim=-1).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, len(self.labels)))

    def score(self, texts: Sequence[str], label: str) -> np.ndarray:
        if label not in self.labels:
            raise DataError(f"classifier has no label '{label}' (labels: {', '.join(self.labels)})")
        return self.predict_proba(texts)[:, self.labels.index(label)]

    def percentile_threshold(self, keep_fraction: float) -> float:
        """The score above which `keep_fraction` of the training pool's documents lie."""
        if not self.reference_scores:
            raise DataError("this classifier has no reference scores; use a fixed threshold")
        return float(np.quantile(self.reference_scores, 1.0 - keep_fraction))

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            save_file({"embed": self.embed.weight.detach().contiguous(),
                       "out": self.out.weight.detach().contiguous()}, str(tmp / "model.safetensors"))
            meta = {"format": FORMAT, "version": 1, "labels": self.labels,
                    "config": dataclasses.asdict(self.cfg), "reference_scores": self.reference_scores}
            (tmp / "classifier.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FastTextClassifier:
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_json(path / "classifier.json", "classifier metadata")
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: not an lmforge fastText classifier (format={meta.get('format')!r})")
        model = cls(meta["labels"], ClassifierConfig(**meta["config"]))
        tensors = load_file(str(path / "model.safetensors"))
        with torch.no_grad():
            model.embed.weight.copy_(tensors["embed"])
            model.out.weight.copy_(tensors["out"])
        model.reference_scores = meta.get("reference_scores", [])
        return model


def train_classifier(examples: Sequence[tuple[str, str]], cfg: ClassifierConfig | None = None,
                     log_every: int = 0) -> FastTextClassifier:
    """Train on (text, label) pairs; labels are taken in sorted order."""
    cfg = cfg or ClassifierConfig()
    labels = sorted({lab for _, lab in examples})
    if len(labels) < 2:
        raise DataError(f"a classifier needs at least two labels, got {labels}")
    torch.manual_seed(cfg.seed)
    model = FastTextClassifier(labels, cfg)
    index = {lab: i for i, lab in enumerate(labels)}
    feats = [features(t, cfg.buckets, cfg.word_ngrams) for t, _ in examples]  # once, not per epoch
    order = list(range(len(examples)))
    rng = random.Random(cfg.seed)
    steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    step = 0
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            ids, offsets = model._batch([], [feats[j] for j in idx])
            target = torch.tensor([index[examples[j][1]] for j in idx])
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1.0 - step / steps)
            # Summed, not averaged: each example moves the weights as a fastText SGD step would.
            loss = torch.nn.functional.cross_entropy(model(ids, offsets), target, reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f}")
    return model


class FastTextFile:
    """A real fastText model file (.bin/.ftz), scored through the fasttext-predict wheel."""

    def __init__(self, path: str | os.PathLike):
        fasttext = require("fasttext", "scoring with a fastText model file", extra="data",
                           package="fasttext-predict")
        if not Path(path).is_file():
            raise DataError(f"fastText model not found: {path}")
        self.model = fasttext.load_model(str(path))
        self.labels = [lab.removeprefix("__label__") for lab in self.model.get_labels()] \
            if hasattr(self.model, "get_labels") else []
        self.reference_scores: list[float] = []

    def score(self, texts: Sequence[str], label: str) -> np.ndarray:
        out = []
        for text in texts:
            labs, probs = self.model.predict(" ".join(text.split()), k=-1)
            scores = {lab.removeprefix("__label__"): float(p) for lab, p in zip(labs, probs)}
            out.append(scores.get(label, 0.0))
        return np.array(out)

    def percentile_threshold(self, keep_fraction: float) -> float:
        raise DataError("a fastText model file carries no reference scores; use a fixed threshold")


def load_classifier(path: str | os.PathLike) -> FastTextClassifier | FastTextFile:
    p = Path(path)
    if p.is_dir():
        return FastTextClassifier.load(p)
    if p.suffix in (".bin", ".ftz"):
        return FastTextFile(p)
    raise DataError(f"classifier not found or of unknown kind: {p} (expected a directory saved by "
                    "lmforge or a fastText .bin/.ftz file)")
