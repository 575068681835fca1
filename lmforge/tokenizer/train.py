"""Byte-level BPE training: from word counts to an ordered list of merges, and `train_bpe`.

Token ids 0..255 are the bytes; merge k creates id 256 + k; special tokens come after the merges.
Each step merges the most frequent adjacent pair, counting a pair once per occurrence in each word
times the word's count; ties go to the lexicographically greater pair of byte strings
(bytes(a), bytes(b)). Pairs are never formed across words (pretokens) or special tokens.

Three implementations that give identical merges (tests assert it):
- `train_merges_reference`: recounts every pair each step; the readable definition, small inputs only.
- `train_merges_incremental`: the real algorithm in Python: pair counts are updated only for words
  that contain the merged pair (a pair -> words index), and the best pair comes from a heap with
  lazy deletion (an entry whose count is out of date is re-queued at its current count; counts of
  existing pairs only ever go down, new pairs are pushed when created).
- the C extension `_bpe_c.train`, the same algorithm as `train_merges_incremental`, used when built.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable

from lmforge.errors import TokenizerError
from lmforge.tokenizer import _native
from lmforge.tokenizer.pretokenize import count_corpus, resolve_pattern

log = logging.getLogger(__name__)


def merge_word(word: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    """Replace every non-overlapping (a, b) in `word`, left to right, by `new`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges_reference(word_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """The definition: recount all pairs, take the best, merge it everywhere, repeat."""
    words = {tuple(w): c for w, c in word_counts.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for step in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], vocab[p[0]], vocab[p[1]]))
        new = 256 + step
        vocab[new] = vocab[a] + vocab[b]
        merges.append((a, b))
        merged: Counter = Counter()
        for word, count in words.items():
            merged[merge_word(word, a, b, new)] += count
        words = merged
    return merges


def _desc_key(token: bytes) -> tuple[int, ...]:
    # Orders byte strings in reverse (a min-heap then pops the greatest): each byte is inverted and
    # the end gets 256, larger than any inverted byte, so a prefix sorts after its extensions.
    return tuple(255 - x for x in token) + (256,)


def train_merges_incremental(word_counts: dict[bytes, int], n_merges: int,
                             progress=None) -> list[tuple[int, int]]:
    """The incremental algorithm (see the module docstring); same result as the reference."""
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    key = {i: _desc_key(bytes([i])) for i in range(256)}
    pair_count: defaultdict = defaultdict(int)
    pair_words: defaultdict = defaultdict(set)
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += counts[wi]
            pair_words[pair].add(wi)
    heap = [(-c, key[a], key[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    for step in range(n_merges):
        best = None
        while heap:
            neg, _, _, a, b = heapq.heappop(heap)
            current = pair_count[(a, b)]
            if current == -neg:
                best = (a, b)
                break
            if current > 0:
                heapq.heappush(heap, (-current, key[a], key[b], a, b))
        if best is None:
            break
        a, b = best
        new = 256 + step
        key[new] = key[a][:-1] + key[b]
        merges.append(best)
        created = set()
        for wi in pair_words.pop(best):
            word = words[wi]
            if not any(word[k] == a and word[k + 1] == b for k in range(len(word) - 1)):
                continue  # stale: the pair left this word in an earlier merge
            c = counts[wi]
            for pair in zip(word, word[1:]):
                pair_count[pair] -= c
            word = list(merge_word(word, a, b, new))
            words[wi] = word
            for pair in zip(word, word[1:]):
                pair_count[pair] += c
                if new in pair:
                    pair_words[pair].add(wi)
                    created.add(pair)
        pair_count[best] = 0
        for p in created:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], key[p[0]], key[p[1]], p[0], p[1]))
        if progress is not None and (step + 1) % 256 == 0:
            progress(256)
    return merges


def train_merges(word_counts: dict[bytes, int], n_merges: int, progress=None,
                 free_input: bool = False) -> list[tuple[int, int]]:
    """Merges for `word_counts`: the C extension when available, else the incremental Python path.

    free_input: empty `word_counts` once its contents are copied (lowers peak memory)."""
    ext = _native.module()
    if ext is None:
        return train_merges_incremental(word_counts, n_merges, progress)
    words, counts = list(word_counts), list(word_counts.values())
    if free_input:
        word_counts.clear()
    return ext.train(words, counts, n_merges, progress)


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = "gpt2",
              special_tokens: Iterable[str] = ("<|endoftext|>",), workers: int | None = None,
              memory_budget: int | None = None, chunk_chars: int = 1 << 20, progress: bool = False,
              stats: dict | None = None):
    """Train a byte-level BPE tokenizer on a stream of texts; returns a `Tokenizer`.

    vocab_size counts the 256 bytes, the merges and the special tokens. workers: processes for
    pretokenization (default: all cores). memory_budget: bytes the word table may use (rare words are
    pruned beyond it; see `pretokenize.count_corpus`). progress: show tqdm bars.
    """
    from lmforge.tokenizer.tokenizer import Tokenizer

    specials = list(dict.fromkeys(special_tokens))
    for s in specials:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"special tokens must be non-empty strings, got {s!r}")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise TokenizerError(f"vocab_size must be at least 256 + {len(specials)} special token(s) = "
                             f"{256 + len(specials)}, got {vocab_size!r}")
    pattern = resolve_pattern(pattern)
    workers = workers or os.cpu_count() or 1
    stats = {} if stats is None else stats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="pretokenize", unit="char", unit_scale=True)
    try:
        counts = count_corpus(texts, pattern, specials, workers=workers, chunk_chars=chunk_chars,
                              memory_budget=memory_budget, progress=bar, stats=stats)
    finally:
        if bar is not None:
            bar.close()
    stats["unique_words"] = len(counts)
    n_merges = vocab_size - 256 - len(specials)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="merge", total=n_merges, unit="merge")
    try:
        merges = train_merges(counts, n_merges, progress=bar.update if bar is not None else None,
                              free_input=True)
    finally:
        if bar is not None:
            bar.update(len(merges) - bar.n if "merges" in locals() else 0)
            bar.close()
    del counts
    if len(merges) < n_merges:
        log.warning("corpus ran out of pairs after %d merges (asked for %d): vocab is %d, not %d",
                    len(merges), n_merges, 256 + len(merges) + len(specials), vocab_size)
    return Tokenizer.from_merges(merges, specials, pattern)
