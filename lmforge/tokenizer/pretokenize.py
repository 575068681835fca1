"""Pretokenization: the regex patterns, splitting on special tokens, and counting words for training.

BPE never merges across a pretoken ("word") boundary, so training only needs how often each distinct
word occurs. This module turns a stream of texts into that word -> count table:

- text is first split on the special tokens (they are never part of a word),
- each piece is split into words by the pretokenization regex (GPT-2 pattern by default, the
  GPT-4 / cl100k pattern selectable),
- words are counted per chunk (in worker processes when asked) and the chunk counts are merged.

Streaming: texts are grouped into chunks of bounded size, at most a few chunks are in flight, and
only the word table grows. With a memory budget the table is pruned of its rarest words whenever it
outgrows the budget (an approximation that the caller is told about; the exact result needs a table
that fits).

This module does not merge anything; see `train.py`.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator

import regex

from lmforge.errors import TokenizerError

log = logging.getLogger(__name__)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """A pattern name ('gpt2', 'gpt4') or a regex string -> the regex string (checked to compile)."""
    pattern = PATTERNS.get(pattern, pattern)
    if not pattern:
        raise TokenizerError("pretokenization pattern is empty; use 'gpt2', 'gpt4' or a regex")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise TokenizerError(f"pretokenization pattern {pattern!r} is not a valid regex: {e}") from None
    return pattern


def pattern_name(pattern: str) -> str | None:
    """'gpt2' / 'gpt4' if the regex is one of the built-in patterns, else None."""
    for name, pat in PATTERNS.items():
        if pat == pattern:
            return name
    return None


def special_regex(specials: Iterable[str]):
    """A compiled regex matching any of the special tokens, longest first (so on overlaps the longest
    special token that starts at a position wins), or None when there are none."""
    specials = sorted(set(specials), key=lambda s: (-len(s), s))
    if not specials:
        return None
    return regex.compile("|".join(regex.escape(s) for s in specials))


def split_on_specials(text: str, special_re) -> list[str]:
    """The ordinary pieces of `text` between special tokens (the special tokens themselves dropped)."""
    if special_re is None:
        return [text]
    return special_re.split(text)


def replace_surrogates(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) become U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def count_words_python(texts: Iterable[str], pattern: str, specials: Iterable[str] = ()) -> Counter:
    """Reference word counter: special-token split, regex findall, Counter of UTF-8 words."""
    pat = regex.compile(pattern)
    special_re = special_regex(specials)
    counts: Counter = Counter()
    for text in texts:
        for piece in split_on_specials(text, special_re):
            counts.update(pat.findall(piece))
    out: Counter = Counter()
    for w, c in counts.items():
        try:
            out[w.encode("utf-8")] += c
        except UnicodeEncodeError:
            out[replace_surrogates(w).encode("utf-8")] += c
    return out


def count_words(texts: Iterable[str], pattern: str, specials: Iterable[str] = ()) -> dict[bytes, int]:
    """Word counts of `texts`; the C counter when built for this pattern, else the reference."""
    from lmforge.tokenizer import _native

    fast = _native.word_counter(pattern)
    if fast is None:
        return count_words_python(texts, pattern, specials)
    special_re = special_regex(specials)
    return fast(piece for text in texts for piece in split_on_specials(text, special_re))


def chunk_texts(texts: Iterable[str], chunk_chars: int, specials: Iterable[str] = (),
                pattern: str = GPT2_PATTERN) -> Iterator[list[str]]:
    """Group a text stream into lists of about `chunk_chars` characters.

    Documents are cut only at document ends or, for a document longer than a chunk, at a special
    token (where no word can straddle the cut) or else at a newline that follows a letter or digit
    (the word holding that letter or digit ends there under both built-in patterns, and neither
    pattern looks behind, so the words on each side are unchanged; for other patterns only special
    tokens cut). A very long document with neither is kept whole.
    """
    special_re = special_regex(specials)
    cut_re = regex.compile(r"(?<=[\p{L}\p{N}])\n") if pattern_name(pattern) else None
    batch: list[str] = []
    size = 0
    for text in texts:
        while len(text) > chunk_chars:
            cut = -1
            if special_re is not None:
                for m in special_re.finditer(text, chunk_chars // 2, chunk_chars * 2):
                    cut = m.end()
                    break
            if cut < 0 and cut_re is not None:
                m = cut_re.search(text, chunk_chars // 2, chunk_chars * 2)
                cut = m.start() if m else -1
            if cut < 0:
                break
            batch.append(text[:cut])
            yield batch
            batch, size, text = [], 0, text[cut:]
        batch.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# Worker state for process pools (set once per worker by the initializer, not per task).
_WORKER: dict = {}


def _init_worker(pattern: str, specials: tuple[str, ...]) -> None:
    _WORKER["pattern"], _WORKER["specials"] = pattern, specials


def _count_chunk(chunk: list[str]) -> dict[bytes, int]:
    return count_words(chunk, _WORKER["pattern"], _WORKER["specials"])


def _entry_bytes(word: bytes) -> int:
    # What one word costs in the table, as CPython lays it out: the bytes object, its count (an int),
    # and its share of the dict (24-byte entry + index, at the dict's typical fill).
    return sys.getsizeof(word) + 32 + 64


def prune_counts(counts: dict[bytes, int], target_bytes: int, stats: dict) -> tuple[dict[bytes, int], int]:
    """Drop the rarest words (count <= t, t doubling) until the table fits `target_bytes`.

    Returns a new, compact dict (a dict never shrinks its storage when keys are deleted) and its size.
    """
    size = sum(_entry_bytes(w) for w in counts)
    threshold = 1
    while size > target_bytes and counts:
        drop = [w for w, c in counts.items() if c <= threshold]
        for w in drop:
            size -= _entry_bytes(w)
            del counts[w]
        stats["pruned_words"] = stats.get("pruned_words", 0) + len(drop)
        stats["pruned_max_count"] = max(threshold, stats.get("pruned_max_count", 0))
        threshold *= 2
    return dict(counts), size


def count_corpus(texts: Iterable[str], pattern: str, specials: Iterable[str] = (), workers: int = 1,
                 chunk_chars: int = 1 << 20, memory_budget: int | None = None, progress=None,
                 stats: dict | None = None) -> dict[bytes, int]:
    """Stream `texts` through the word counter in chunks, in `workers` processes when > 1.

    memory_budget: bytes that counting and the merge loop after it may use. The word table is pruned
    of its rarest words (counted in `stats['pruned_words']`) whenever it outgrows a third of the
    budget, down to a sixth, and chunks are cut to a fiftieth, so memory stays bounded on any corpus
    size; the rest of the budget is for the merge loop, whose structures are about the table's size.
    progress: a tqdm-like object whose `update(n_chars)` is called per chunk.
    """
    stats = {} if stats is None else stats
    specials = tuple(specials)
    if memory_budget is not None:
        chunk_chars = max(4096, min(chunk_chars, memory_budget // 50))
    total: dict[bytes, int] = {}
    table_bytes = 0
    chunks = chunk_texts(texts, chunk_chars, specials, pattern)

    def merge(part: dict[bytes, int], n_chars: int) -> None:
        nonlocal table_bytes, total
        get = total.get
        for w, c in part.items():
            old = get(w)
            if old is None:
                table_bytes += _entry_bytes(w)
                total[w] = c
            else:
                total[w] = old + c
        stats["chars"] = stats.get("chars", 0) + n_chars
        if memory_budget is not None and table_bytes > memory_budget // 3:
            total, table_bytes = prune_counts(total, memory_budget // 6, stats)
        if progress is not None:
            progress.update(n_chars)

    if workers <= 1:
        for chunk in chunks:
            merge(count_words(chunk, pattern, specials), sum(map(len, chunk)))
    else:
        import multiprocessing as mp
        from collections import deque

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(pattern, specials)) as pool:
            # At most 2 chunks per worker in flight, so memory stays bounded (Pool.imap would read
            # the whole input ahead).
            pending: deque = deque()
            for chunk in chunks:
                pending.append((pool.apply_async(_count_chunk, (chunk,)), sum(map(len, chunk))))
                if len(pending) >= 2 * workers:
                    result, n = pending.popleft()
                    merge(result.get(), n)
            while pending:
                result, n = pending.popleft()
                merge(result.get(), n)
    if stats.get("pruned_words"):
        log.warning("memory budget: pruned %d rare words (count <= %d when pruned) from the word table; "
                    "counts of the words kept may be low by up to that much", stats["pruned_words"],
                    stats["pruned_max_count"])
    return total
