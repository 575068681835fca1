"""Exact deduplication (documents, lines) across all tasks, and Bloom-filter streaming dedup.

- `exact_dedup` (global): 64-bit hash of each document's (optionally normalised) text; the first
  copy in (task, position) order survives, later copies are dropped with reason `duplicate`. The
  plan works one hash partition at a time, holding about 1/partitions of the hashes at once.
- `line_dedup` (global, two passes, the CS336 recipe): pass 1 counts every line's hash across all
  tasks; pass 2 removes every line whose count is ≥ 2, all copies of it (boilerplate that repeats
  is what this is for); a document left with no lines is dropped (`empty_after_line_dedup`).
  Memory: counts are merged one hash partition at a time (`partitions`), so the merge holds about
  1/partitions of the distinct line hashes (8 bytes each) at once.
- `bloom_dedup` (streaming, per task): an own Bloom filter sized from the expected number of items
  and a target false-positive rate; lines or paragraphs already seen are removed. A false positive
  removes a line that was not a duplicate, at the configured rate. It sees one task's stream, so
  run with tasks = 1 for corpus-wide dedup.

Hashes: xxhash64 when installed, else BLAKE2b-64 (same API, slower).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import unicodedata
from collections.abc import Iterator
from typing import Literal

import numpy as np
import regex as re

from lmforge.data.pipeline import GlobalStep, PipelineStep, nbytes, register
from lmforge.data.sources import Document
from lmforge.errors import ConfigError

try:
    import xxhash

    def hash64(text: str, seed: int = 0) -> int:
        return xxhash.xxh3_64_intdigest(text.encode("utf-8"), seed)

    def hash128(text: str) -> int:
        return xxhash.xxh3_128_intdigest(text.encode("utf-8"))
except ImportError:  # pragma: no cover - exercised only without xxhash
    import hashlib

    def hash64(text: str, seed: int = 0) -> int:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little"))
        return int.from_bytes(h.digest(), "little")

    def hash128(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")


_MARKS = re.compile(r"\p{Mn}+")  # combining marks left by NFD: the accents


@functools.cache
def _punct_table() -> dict[int, str]:
    """Every Unicode punctuation code point (categories P*) → a space; built once (~0.3 s)."""
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def normalize(text: str, lowercase: bool = True, punctuation: bool = True, accents: bool = True,
              whitespace: bool = True) -> str:
    """The normalisation used before hashing: lowercase, strip accents (NFD, then drop combining
    marks), turn Unicode punctuation into spaces, collapse whitespace runs to one space and trim;
    each can be turned off."""
    if lowercase:
        text = text.lower()
    if accents and not text.isascii():
        text = _MARKS.sub("", unicodedata.normalize("NFD", text))
    if punctuation:
        text = text.translate(_punct_table())  # str.translate: ~6x faster than a \p{P} regex
    if whitespace:
        text = " ".join(text.split())
    return text


class _DiskState(GlobalStep):
    """Shared plumbing: per-rank files under the step's work directory."""

    def _path(self, kind: str, rank: int):
        assert self.workdir is not None, "the executor sets workdir before running a global step"
        d = self.workdir / kind
        d.mkdir(parents=True, exist_ok=True)
        return d / f"rank_{rank:05d}.npy"

    def _save(self, kind: str, rank: int, arr: np.ndarray) -> None:
        from lmforge.io import atomic_file

        with atomic_file(self._path(kind, rank), "wb") as f:
            np.save(f, arr)

    def _load(self, kind: str, rank: int) -> np.ndarray:
        return np.load(self._path(kind, rank))


@register("exact_dedup")
class ExactDedup(_DiskState):
    @dataclasses.dataclass
    class Config:
        normalize: bool = False  # hash the normalised text (see `normalize`) instead of the raw text
        partitions: int = 16  # the plan holds about 1/partitions of all (hash, position) pairs at once

    def _key(self, doc: Document) -> int:
        return hash64(normalize(doc.text) if self.cfg.normalize else doc.text)

    def observe(self, docs: Iterator[Document], rank: int, world: int) -> Iterator[Document]:
        hashes = []
        for doc in docs:
            hashes.append(self._key(doc))
            yield doc
        self._save("hashes", rank, np.array(hashes, dtype=np.uint64))

    def plan(self, world: int) -> dict[str, int]:
        p = self.cfg.partitions
        if p < 1:
            raise ConfigError(f"exact_dedup: partitions must be ≥ 1, got {p}")
        drops: list[list[np.ndarray]] = [[] for _ in range(world)]
        for part in range(p):
            hs, ranks, pos = [], [], []
            for r in range(world):
                h = np.load(self._path("hashes", r), mmap_mode="r")
                idx = np.flatnonzero((h % np.uint64(p)) == part)
                hs.append(np.asarray(h[idx]))
                ranks.append(np.full(len(idx), r, dtype=np.int64))
                pos.append(idx)
            h, rk, ps = np.concatenate(hs), np.concatenate(ranks), np.concatenate(pos)
            # (rank, position) order is already the concatenation order, so the first index of
            # each hash in it is the copy that survives.
            keep = np.zeros(len(h), dtype=bool)
            keep[np.unique(h, return_index=True)[1]] = True
            for r in range(world):
                drops[r].append(ps[(~keep) & (rk == r)])
        for r in range(world):
            self._save("drops", r, np.sort(np.concatenate(drops[r])).astype(np.int64))
        return {}

    def drops_for(self, rank: int) -> dict[int, str]:
        return {int(p): "duplicate" for p in self._load("drops", rank)}


def _lines(text: str) -> list[str]:
    return text.split("\n")


@register("line_dedup")
class LineDedup(_DiskState):
    @dataclasses.dataclass
    class Config:
        partitions: int = 16
        min_chars: int = 1  # lines shorter than this (after strip) are never removed

    def _hashes(self, doc: Document) -> list[int]:
        return [hash64(ln.strip()) for ln in _lines(doc.text) if len(ln.strip()) >= self.cfg.min_chars]

    def observe(self, docs: Iterator[Document], rank: int, world: int) -> Iterator[Document]:
        hashes: list[int] = []
        for doc in docs:
            hashes.extend(self._hashes(doc))
            yield doc
        uniq, counts = np.unique(np.array(hashes, dtype=np.uint64), return_counts=True)
        self._save("counts", rank, np.stack([uniq, counts.astype(np.uint64)]))

    def plan(self, world: int) -> dict[str, int]:
        p = self.cfg.partitions
        if p < 1:
            raise ConfigError(f"line_dedup: partitions must be ≥ 1, got {p}")
        dups = []
        for part in range(p):
            hs, cs = [], []
            for r in range(world):
                a = np.load(self._path("counts", r), mmap_mode="r")
                mask = (a[0] % np.uint64(p)) == part
                hs.append(np.asarray(a[0][mask]))
                cs.append(np.asarray(a[1][mask]))
            h, c = np.concatenate(hs), np.concatenate(cs)
            order = np.argsort(h, kind="stable")
            h, c = h[order], c[order]
            uniq, starts = np.unique(h, return_index=True)
            totals = np.add.reduceat(c, starts) if len(h) else np.zeros(0, np.uint64)
            dups.append(uniq[totals >= 2])
        dup = np.sort(np.concatenate(dups))
        self._save("dups", 0, dup)
        return {"duplicated_lines": int(len(dup))}

    def run(self, docs: Iterator[Document], rank: int = 0, world: int = 1) -> Iterator[Document]:
        dup = set(self._load("dups", 0).tolist())
        for doc in docs:
            self.stats.docs_in += 1
            self.stats.bytes_in += nbytes(doc)
            kept = []
            for ln in _lines(doc.text):
                s = ln.strip()
                if len(s) >= self.cfg.min_chars and hash64(s) in dup:
                    self.stat("lines_removed")
                    continue
                kept.append(ln)
            text = "\n".join(kept).strip()
            if not text:
                self.drop(doc, "empty_after_line_dedup")
                continue
            doc.text = text
            self.stats.docs_out += 1
            self.stats.bytes_out += nbytes(doc)
            yield doc


class BloomFilter:
    """A Bloom filter: m bits, k hash functions by double hashing (Kirsch & Mitzenmacher 2006).

    Sized for `capacity` items at false-positive rate `fp_rate`: m = -n ln p / (ln 2)², k = (m/n) ln 2.
    """

    def __init__(self, capacity: int, fp_rate: float = 1e-3):
        if capacity < 1 or not 0 < fp_rate < 1:
            raise ConfigError(f"Bloom filter needs capacity ≥ 1 and 0 < fp_rate < 1, got {capacity}, {fp_rate}")
        self.m = max(8, math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2))
        self.k = max(1, round(self.m / capacity * math.log(2)))
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)

    def _positions(self, item: str) -> list[int]:
        h = hash128(item)
        h1, h2 = h & 0xFFFFFFFFFFFFFFFF, (h >> 64) | 1
        return [(h1 + i * h2) % self.m for i in range(self.k)]

    def add(self, item: str) -> bool:
        """Insert; return True if the item was (probably) present already."""
        present = True
        for p in self._positions(item):
            byte, bit = divmod(p, 8)
            if not self.bits[byte] >> bit & 1:
                present = False
                self.bits[byte] |= np.uint8(1 << bit)
        return present

    def __contains__(self, item: str) -> bool:
        return all(self.bits[p // 8] >> (p % 8) & 1 for p in self._positions(item))


@register("bloom_dedup")
class BloomDedup(PipelineStep):
    """Remove lines or paragraphs already seen in this task's stream (approximately, via Bloom)."""

    @dataclasses.dataclass
    class Config:
        unit: Literal["line", "paragraph"] = "paragraph"
        capacity: int = 10_000_000
        fp_rate: float = 1e-4
        min_chars: int = 1

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        self.bloom = BloomFilter(self.cfg.capacity, self.cfg.fp_rate)

    def start(self, rank: int) -> None:
        self.bloom = BloomFilter(self.cfg.capacity, self.cfg.fp_rate)

    def process(self, doc: Document) -> Document | None:
        sep = "\n" if self.cfg.unit == "line" else "\n\n"
        kept = []
        for unit in re.split(r"\n" if self.cfg.unit == "line" else r"\n\s*\n", doc.text):
            key = unit.strip()
            if len(key) >= self.cfg.min_chars and self.bloom.add(key):
                self.stat(f"{self.cfg.unit}s_removed")
                continue
            kept.append(unit)
        doc.text = sep.join(kept).strip()
        if not doc.text:
            self.stat("docs_emptied")
            return None
        return doc
