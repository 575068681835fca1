"""MinHash-LSH near-duplicate detection, written here: shingles, permutations, banding, union-find.

Recipe (Broder 1997; Leskovec et al., *Mining of Massive Datasets* ch. 3; FineWeb's defaults):

1. Normalise (lowercase, strip punctuation and accents, collapse whitespace; `dedup.normalize`)
   and cut into word n-grams (`ngram` = 5). A document shorter than n words is one shingle.
2. Hash each shingle to 32 bits: words are hashed once (xxh3-64), an n-gram's hash is a polynomial
   combination of its word hashes (mod 2^64), folded to 32 bits.
3. `num_hashes` permutations h_i(x) = a_i · fmix32(x) + b_i mod 2^32 with odd a_i (the scheme of
   datasketch ≥ 2.0, "affine32"; fmix32 is MurmurHash3's finaliser). Signature = per-permutation
   minimum over the document's shingles.
4. LSH: split the signature into `bands` bands of r = num_hashes / bands rows; documents that agree
   on every row of some band are candidates. P(candidate | Jaccard s) = 1 - (1 - s^r)^b.
5. Verify each candidate pair with the true Jaccard similarity of their shingle sets
   (≥ `threshold`), then union-find the verified pairs into clusters; the first document of each
   cluster (task, position order) survives, the rest are dropped with reason `near_duplicate`.

`signatures_reference` is the readable spec; `signatures` is the batched numpy path (one matrix
op per chunk of documents); tests assert they agree, and agree with datasketch.
Memory: the plan step holds every document's signature (4·num_hashes bytes) and shingle-hash set
(8 bytes per shingle) — fine for one machine's worth of text, not for a whole crawl.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from lmforge.data.dedup import _DiskState, hash64, normalize
from lmforge.data.pipeline import register
from lmforge.data.sources import Document
from lmforge.errors import ConfigError

_M32 = np.uint64(0xFFFFFFFF)
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for combining word hashes


def permutations(num_hashes: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the affine permutations, uint32, a odd."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_hashes, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_hashes, dtype=np.uint64).astype(np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, elementwise on uint32 (a bijection that mixes all bits)."""
    h = h.astype(np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Sorted unique 64-bit hashes of the document's word n-grams (after normalisation)."""
    words = normalize(text).split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter((hash64(x) for x in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(w))
    with np.errstate(over="ignore"):
        h = np.zeros(len(w) - n + 1, dtype=np.uint64)
        for j in range(n):  # h = sum_j w[i+j] * POLY^(n-1-j) mod 2^64, Horner's rule
            h = h * _POLY + w[j:len(w) - n + 1 + j]
    return np.unique(h)


def fold32(h64: np.ndarray) -> np.ndarray:
    return ((h64 >> np.uint64(32)) ^ (h64 & _M32)).astype(np.uint32)


def signatures_reference(shingles: Sequence[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The spec, one shingle and one permutation at a time in Python integers."""
    out = np.full((len(shingles), len(a)), 0xFFFFFFFF, dtype=np.uint32)
    for d, sh in enumerate(shingles):
        xs = fmix32(fold32(sh)).tolist()
        for i, (ai, bi) in enumerate(zip(a.tolist(), b.tolist())):
            if xs:
                out[d, i] = min((ai * x + bi) % 2**32 for x in xs)
    return out


def signatures(shingles: Sequence[np.ndarray], a: np.ndarray, b: np.ndarray,
               chunk: int = 1 << 15) -> np.ndarray:
    """Batched: permute every shingle of many documents in one matrix op, then a segmented min."""
    out = np.full((len(shingles), len(a)), 0xFFFFFFFF, dtype=np.uint32)
    start = 0
    while start < len(shingles):
        stop, size = start, 0
        while stop < len(shingles) and (size == 0 or size + len(shingles[stop]) <= chunk):
            size += len(shingles[stop])
            stop += 1
        group = [(i, s) for i, s in zip(range(start, stop), shingles[start:stop]) if len(s)]
        if group:
            x = fmix32(fold32(np.concatenate([s for _, s in group])))
            with np.errstate(over="ignore"):
                perm = x[:, None] * a[None, :] + b[None, :]  # uint32: wraps mod 2^32 by design
            offsets = np.cumsum([0] + [len(s) for _, s in group[:-1]])
            out[[i for i, _ in group]] = np.minimum.reduceat(perm, offsets, axis=0)
        start = stop
    return out


def lsh_candidates(sigs: np.ndarray, bands: int, max_bucket_pairs: int = 64) -> set[tuple[int, int]]:
    """Pairs (i < j) that share at least one band bucket.

    A bucket of k documents gives all k(k-1)/2 pairs while k ≤ max_bucket_pairs, else pairs of each
    member with the first one (huge buckets are exact copies in practice; verification still runs).
    """
    n, h = sigs.shape
    if bands < 1 or h % bands:
        raise ConfigError(f"minhash: num_hashes ({h}) must be a multiple of bands ({bands})")
    r = h // bands
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        rows = np.ascontiguousarray(sigs[:, band * r:(band + 1) * r])
        for i in range(n):
            buckets[rows[i].tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            if len(members) <= max_bucket_pairs:
                pairs.update((members[x], members[y]) for x in range(len(members))
                             for y in range(x + 1, len(members)))
            else:
                pairs.update((members[0], m) for m in members[1:])
    return pairs


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays."""
    if len(x) == 0 and len(y) == 0:
        return 1.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


class UnionFind:
    """Disjoint sets with path halving; the root of a set is its smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def near_duplicates(shingles: Sequence[np.ndarray], num_hashes: int = 112, bands: int = 14,
                    threshold: float = 0.7, seed: int = 1) -> tuple[list[int], dict[str, int]]:
    """Indices of documents to drop (all but the first of each verified cluster), and counters."""
    a, b = permutations(num_hashes, seed)
    sigs = signatures(shingles, a, b)
    empty = {i for i, s in enumerate(shingles) if len(s) == 0}
    cands = [(i, j) for i, j in lsh_candidates(sigs, bands) if i not in empty and j not in empty]
    uf = UnionFind(len(shingles))
    verified = 0
    for i, j in sorted(cands):
        if uf.find(i) != uf.find(j) and jaccard(shingles[i], shingles[j]) >= threshold:
            uf.union(i, j)
            verified += 1
    drop = [i for i in range(len(shingles)) if uf.find(i) != i]
    return drop, {"candidate_pairs": len(cands), "verified_pairs": verified}


@register("minhash_dedup")
class MinHashDedup(_DiskState):
    @dataclasses.dataclass
    class Config:
        ngram: int = 5
        num_hashes: int = 112
        bands: int = 14
        threshold: float = 0.7  # true Jaccard needed to call a candidate pair a duplicate
        seed: int = 1

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        if self.cfg.bands < 1 or self.cfg.num_hashes % self.cfg.bands:
            raise ConfigError(f"minhash_dedup: num_hashes ({self.cfg.num_hashes}) must be a multiple "
                              f"of bands ({self.cfg.bands})")
        if not 0.0 < self.cfg.threshold <= 1.0:
            raise ConfigError(f"minhash_dedup: threshold must be in (0, 1], got {self.cfg.threshold}")

    def observe(self, docs: Iterator[Document], rank: int, world: int) -> Iterator[Document]:
        shingles = []
        for doc in docs:
            shingles.append(shingle_hashes(doc.text, self.cfg.ngram))
            yield doc
        lengths = np.array([len(s) for s in shingles], dtype=np.int64)
        flat = np.concatenate(shingles) if shingles else np.zeros(0, np.uint64)
        self._save("lengths", rank, lengths)
        self._save("shingles", rank, flat)

    def plan(self, world: int) -> dict[str, int]:
        shingles, owner = [], []
        for r in range(world):
            lengths, flat = self._load("lengths", r), self._load("shingles", r)
            shingles.extend(np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else [])
            owner.extend((r, p) for p in range(len(lengths)))
        drop, counters = near_duplicates(shingles, self.cfg.num_hashes, self.cfg.bands,
                                         self.cfg.threshold, self.cfg.seed)
        per_rank: dict[int, list[int]] = defaultdict(list)
        for i in drop:
            per_rank[owner[i][0]].append(owner[i][1])
        for r in range(world):
            self._save("drops", r, np.array(sorted(per_rank[r]), dtype=np.int64))
        return counters

    def drops_for(self, rank: int) -> dict[int, str]:
        return {int(p): "near_duplicate" for p in self._load("drops", rank)}
