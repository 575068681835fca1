"""MinHash-LSH near-duplicate detection, written here: shingles, permutations, banding, union-find.

Recipe (Broder 1997; Leskovec et al., *Mining of Massive Datasets* ch. 3; FineWeb's defaults):

1. Normalise (lowercase, strip punctuation and accents, collapse whitespace; `dedup.normalize`)
   and cut into word n-grams (`ngram` = 5). A document shorter than n words is one shingle.
2. Hash each shingle: a polynomial hash of its bytes mod 2^64 (computed for all shingles at once
   from prefix sums), mixed by MurmurHash3's fmix64; folded to 32 bits for the signature.
3. `num_hashes` permutations h_i(x) = a_i · fmix32(x) + b_i mod 2^32 with odd a_i (the scheme of
   datasketch ≥ 2.0, "affine32"; fmix32 is MurmurHash3's finaliser). Signature = per-permutation
   minimum over the document's shingles.
4. LSH: split the signature into `bands` bands of r = num_hashes / bands rows; documents that agree
   on every row of some band are candidates. P(candidate | Jaccard s) = 1 - (1 - s^r)^b.
5. Verify each candidate pair with the true Jaccard similarity of their shingle sets
   (≥ `threshold`), then union-find the verified pairs into clusters; the first document of each
   cluster (task, position order) survives, the rest are dropped with reason `near_duplicate`.

`shingle_hashes_reference` and `signatures_reference` are the readable spec; `shingle_hashes` and
`signatures` the vectorised paths (prefix sums; one matrix op per chunk of documents); tests
assert they agree, and that signatures agree with datasketch's on the same shingle hashes.
Memory: the plan step holds every document's signature (4·num_hashes bytes) and shingle-hash set
(8 bytes per shingle) — fine for one machine's worth of text, not for a whole crawl.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from lmforge.data.dedup import _DiskState, normalize
from lmforge.data.pipeline import register
from lmforge.data.sources import Document
from lmforge.errors import ConfigError

_M32 = np.uint64(0xFFFFFFFF)


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


_P = 0x100000001B3  # odd base of the polynomial byte hash; invertible mod 2^64
_P_INV = pow(_P, -1, 2**64)
_POW = np.ones(1, dtype=np.uint64)
_POW_INV = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i mod 2^64 for i < n (cached, grown by doubling)."""
    global _POW, _POW_INV
    if len(_POW) < n:
        size = 1 << (n - 1).bit_length()
        with np.errstate(over="ignore"):
            _POW = np.cumprod(np.r_[1, np.full(size - 1, _P, dtype=np.uint64)].astype(np.uint64), dtype=np.uint64)
            _POW_INV = np.cumprod(np.r_[1, np.full(size - 1, _P_INV, dtype=np.uint64)].astype(np.uint64),
                                  dtype=np.uint64)
    return _POW[:n], _POW_INV[:n]


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection): spreads the polynomial hash over all bits."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def _sorted_unique(h: np.ndarray) -> np.ndarray:
    """np.unique for uint64, by sort + neighbour compare (several times faster than np.unique's
    hash-based path in NumPy 2 for arrays of this size)."""
    h = np.sort(h)
    keep = np.empty(len(h), dtype=bool)
    keep[:1] = True
    np.not_equal(h[1:], h[:-1], out=keep[1:])
    return h[keep]


def shingle_hashes_reference(text: str, ngram: int = 5) -> np.ndarray:
    """The spec: each n-gram's UTF-8 bytes (words joined by one space) hashed as
    fmix64(sum_j byte_j · P^j mod 2^64), one shingle at a time in Python integers."""
    words = normalize(text).split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    n = min(ngram, len(words))
    out = set()
    for i in range(len(words) - n + 1):
        data = " ".join(words[i:i + n]).encode("utf-8")
        out.add(sum(c * pow(_P, j, 2**64) for j, c in enumerate(data)) % 2**64)
    return np.unique(fmix64(np.array(sorted(out), dtype=np.uint64)))


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Sorted unique 64-bit hashes of the document's word n-grams (after normalisation).

    Vectorised: prefix sums S of byte_j · P^j over the whole normalised text give any span's
    hash as (S[end] - S[start]) · P^-start, so no Python loop runs per word or per shingle.
    """
    t = normalize(text).encode("utf-8")
    if not t:
        return np.zeros(0, dtype=np.uint64)
    b = np.frombuffer(t, dtype=np.uint8).astype(np.uint64)
    spaces = np.flatnonzero(b == 32)
    starts = np.concatenate(([0], spaces + 1))
    ends = np.concatenate((spaces, [len(b)]))
    n = min(ngram, len(starts))
    s, e = starts[:len(starts) - n + 1], ends[n - 1:]
    pw, pw_inv = _powers(len(b) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(b) + 1, dtype=np.uint64)
        np.cumsum(b * pw[:len(b)], out=prefix[1:])
        h = (prefix[e] - prefix[s]) * pw_inv[s]
    return _sorted_unique(fmix64(h))


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
            # (hashes × shingles), so each permutation's row is contiguous for the segmented min.
            perm = np.empty((len(a), len(x)), dtype=np.uint32)
            with np.errstate(over="ignore"):  # uint32 arithmetic wraps mod 2^32 by design
                np.multiply(a[:, None], x[None, :], out=perm)
                perm += b[:, None]
            offsets = np.cumsum([0] + [len(s) for _, s in group[:-1]])
            out[[i for i, _ in group]] = np.minimum.reduceat(perm, offsets, axis=1).T
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
