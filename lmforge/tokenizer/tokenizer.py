"""The `Tokenizer`: byte-level BPE encoding and decoding with special tokens.

A tokenizer is a vocabulary (id -> bytes), an ordered list of merges (a, b) -> new id, the special
tokens (str -> id) and the pretokenization regex. Encoding splits text on allowed special tokens,
splits each ordinary piece into words with the regex (or the C extension's exact
re-implementation of the built-in patterns, when built), and turns each word into ids by starting
from its bytes and repeatedly merging the adjacent pair with the earliest merge (the BPE
definition). A word -> ids cache makes repeated words cost one dict lookup.

Special tokens follow tiktoken's rules: `allowed_special` are encoded as their ids; any other
special token in the text raises unless it is excluded from `disallowed_special`, in which case it
is encoded as ordinary text. On overlapping special tokens the longest match at the leftmost
position wins.

Backends: "reference" (the Python encoder above) or "tiktoken" (built offline from our ranks; it
needs ids that ascend with merge order, which trained and GPT-2 tokenizers have). Tests assert they
give identical ids. Saving and loading files lives in `formats.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator

import regex

from lmforge.errors import TokenizerError, require
from lmforge.tokenizer import _native
from lmforge.tokenizer.pretokenize import pattern_name, replace_surrogates, resolve_pattern, special_regex

_CACHE_LIMIT = 200_000
_NO_MERGE = 1 << 62  # rank of a pair that is not a merge


class Tokenizer:
    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[int, int, int]],
                 special_tokens: dict[str, int], pattern: str, backend: str = "reference"):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)
        self.pattern = resolve_pattern(pattern)
        self._validate()
        self.byte_ids = [0] * 256
        for i, b in self.vocab.items():
            if len(b) == 1 and i not in self.special_ids:
                self.byte_ids[b[0]] = i
        self.ranks = {(a, b): (rank, new) for rank, (a, b, new) in enumerate(self.merges)}
        self._pat = regex.compile(self.pattern)
        self._split = _native.splitter(self.pattern) or self._pat.findall
        self._fast_encode = _native.word_encoder(self.pattern)
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = None
        self.backend = "reference"
        self.set_backend(backend)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_merges(cls, merges: list[tuple[int, int]], special_tokens: Iterable[str] = (),
                    pattern: str = "gpt2", backend: str = "reference") -> Tokenizer:
        """The tokenizer that training produces: bytes 0..255, merge k -> 256 + k, then specials."""
        vocab = {i: bytes([i]) for i in range(256)}
        full = []
        for k, (a, b) in enumerate(merges):
            vocab[256 + k] = vocab[a] + vocab[b]
            full.append((a, b, 256 + k))
        specials = {s: len(vocab) + i for i, s in enumerate(dict.fromkeys(special_tokens))}
        vocab.update({i: s.encode("utf-8") for s, i in specials.items()})
        return cls(vocab, full, specials, pattern, backend)

    def _validate(self) -> None:
        n = len(self.vocab)
        if sorted(self.vocab) != list(range(n)):
            raise TokenizerError(f"vocab ids must be 0..{n - 1} without gaps")
        self.special_ids = set(self.special_tokens.values())
        for s, i in self.special_tokens.items():
            if not s:
                raise TokenizerError("special tokens must be non-empty strings")
            if self.vocab.get(i) != s.encode("utf-8"):
                raise TokenizerError(f"special token {s!r} has id {i}, whose vocab entry is {self.vocab.get(i)!r}")
        singles = {b for i, b in self.vocab.items() if len(b) == 1 and i not in self.special_ids}
        if len(singles) != 256:
            raise TokenizerError(f"vocab must hold all 256 single bytes, it holds {len(singles)}")
        for a, b, new in self.merges:
            if a not in self.vocab or b not in self.vocab or new not in self.vocab:
                raise TokenizerError(f"merge ({a}, {b}) -> {new} uses an id outside the vocab")
            if self.vocab[a] + self.vocab[b] != self.vocab[new]:
                raise TokenizerError(f"merge ({a}, {b}) -> {new}: {self.vocab[new]!r} is not "
                                     f"{self.vocab[a]!r} + {self.vocab[b]!r}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eot_id(self) -> int | None:
        """The document token's id (`<|endoftext|>`), else the first special token's, else None."""
        if "<|endoftext|>" in self.special_tokens:
            return self.special_tokens["<|endoftext|>"]
        return min(self.special_ids) if self.special_ids else None

    @functools.cached_property
    def hash(self) -> str:
        """A stable content hash (pattern, vocab, merges, specials): it names the tokenizer in shards."""
        body = {"pattern": self.pattern, "vocab": [self.vocab[i].hex() for i in range(len(self.vocab))],
                "merges": [list(m) for m in self.merges],
                "special_tokens": sorted(self.special_tokens.items(), key=lambda kv: kv[1])}
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ backends

    def set_backend(self, backend: str) -> None:
        """'reference', 'tiktoken', or 'auto' (tiktoken when installed and compatible)."""
        if backend not in ("reference", "tiktoken", "auto"):
            raise TokenizerError(f"backend must be 'reference', 'tiktoken' or 'auto', got {backend!r}")
        if backend == "reference":
            self.backend, self._tiktoken = "reference", None
            return
        problem = self._tiktoken_problem()
        if backend == "auto":
            try:
                import tiktoken  # noqa: F401
            except ImportError:
                problem = problem or "tiktoken is not installed"
            if problem:
                self.backend, self._tiktoken = "reference", None
                return
        elif problem:
            raise TokenizerError(f"tiktoken backend unavailable: {problem}")
        self._tiktoken = self.to_tiktoken()
        self.backend = "tiktoken"

    def _tiktoken_problem(self) -> str | None:
        last = -1
        for _, _, new in self.merges:
            if new <= last:
                return "merge ids do not ascend with merge order (tiktoken ranks are ids)"
            last = new
        return None

    def mergeable_ranks(self) -> dict[bytes, int]:
        """tiktoken's view: every non-special token's bytes -> its id (its rank)."""
        return {b: i for i, b in self.vocab.items() if i not in self.special_ids}

    def to_tiktoken(self):
        """A `tiktoken.Encoding` built offline from this tokenizer's ranks."""
        tiktoken = require("tiktoken", "the tiktoken backend", extra="interop")
        return tiktoken.Encoding(name=f"lmforge-{self.hash}", pat_str=self.pattern,
                                 mergeable_ranks=self.mergeable_ranks(),
                                 special_tokens=dict(self.special_tokens))

    # ------------------------------------------------------------------ encoding

    def _encode_word(self, word: bytes) -> list[int]:
        """BPE on one word: repeatedly merge the adjacent pair with the earliest merge.

        Merging one occurrence at a time (the leftmost of the earliest pair) gives the same result as
        merging all occurrences of that pair left to right, because a pair that involves the new
        token always comes later in the merge order. Only the two pairs next to a merge are
        re-ranked, so a word of n bytes costs O(n) rank lookups plus O(n) per merge for the min.
        """
        ids = [self.byte_ids[b] for b in word]
        if len(ids) < 2:
            return ids
        ranks = self.ranks
        none = (_NO_MERGE, -1)
        pair = [ranks.get((ids[i], ids[i + 1]), none) for i in range(len(ids) - 1)]
        while pair:
            i = min(range(len(pair)), key=pair.__getitem__)
            rank, new = pair[i]
            if rank == _NO_MERGE:
                break
            ids[i:i + 2] = [new]
            del pair[i]
            if i > 0:
                pair[i - 1] = ranks.get((ids[i - 1], new), none)
            if i < len(pair):
                pair[i] = ranks.get((new, ids[i + 1]), none)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with every special token treated as ordinary text."""
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        if self._fast_encode is not None:  # the same loop as _encode_words, in C
            return self._fast_encode(text, self._cache, self._encode_str, _CACHE_LIMIT)
        return self._encode_words(self._split(text))

    def _encode_str(self, word: str) -> list[int]:
        try:
            raw = word.encode("utf-8")
        except UnicodeEncodeError:
            raw = replace_surrogates(word).encode("utf-8")
        return self._encode_word(raw)

    def _encode_words(self, words: Iterable[str]) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for word in words:
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_str(word)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)
        return out

    def _special_sets(self, allowed_special, disallowed_special) -> tuple[set, set]:
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
        return allowed, disallowed

    def encode(self, text: str, allowed_special: Iterable[str] | str = (),
               disallowed_special: Iterable[str] | str = "all") -> list[int]:
        """Ids of `text`. Special tokens in `allowed_special` ("all" for every one) become their ids;
        a special token in `disallowed_special` (default: every one not allowed) raises
        TokenizerError; one in neither is encoded as ordinary text."""
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed:
            self._check_disallowed(self._allowed_re(frozenset(disallowed)), text)
        if not allowed:
            return self.encode_ordinary(text)
        out: list[int] = []
        start = 0
        for m in self._allowed_re(frozenset(allowed)).finditer(text):
            out.extend(self.encode_ordinary(text[start:m.start()]))
            out.append(self.special_tokens[m.group()])
            start = m.end()
        out.extend(self.encode_ordinary(text[start:]))
        return out

    @staticmethod
    def _check_disallowed(disallowed_re, text: str, pos: int = 0) -> None:
        m = disallowed_re.search(text, pos)
        if m:
            raise TokenizerError(
                f"text contains the special token {m.group()!r} at character {m.start()}; pass "
                f"allowed_special={{{m.group()!r}}} to encode it as a special token, or "
                "disallowed_special=() to encode it as ordinary text")

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a handful of allowed sets per tokenizer)
    def _allowed_re(self, allowed: frozenset):
        return special_regex(allowed)

    def encode_iterable(self, texts: Iterable[str], allowed_special: Iterable[str] | str = (),
                        disallowed_special: Iterable[str] | str = "all") -> Iterator[int]:
        """Yield the ids of "".join(texts) lazily, holding only a small tail of text in memory.

        Ids equal `encode("".join(texts))`. Each chunk is appended to the carried tail; text up to the
        last allowed special token is final; after it, words are split with the whole buffer as
        context and all but the last two are final (more text can still change how those two
        split), and nothing from a possible prefix of a special token on is final. The rest is
        carried into the next chunk.
        """
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        allowed_re = self._allowed_re(frozenset(allowed)) if allowed else None
        disallowed_re = self._allowed_re(frozenset(disallowed)) if disallowed else None
        longest = max((len(s) for s in self.special_tokens), default=0)
        carry = seen = ""  # seen: the last characters before carry, for special tokens that straddle it
        for chunk in texts:
            buf = carry + chunk
            if disallowed_re is not None:
                self._check_disallowed(disallowed_re, seen + buf)
            # A special token match is final unless more text could make a longer one: only matches
            # that start before the earliest suffix that is a proper prefix of a special token.
            partial = self._partial_start(buf, 0, longest)
            tail = 0
            if allowed_re is not None:
                for m in allowed_re.finditer(buf):
                    if m.start() >= partial:
                        break
                    tail = m.end()
            words = [m.span() for m in self._pat.finditer(buf, tail)]
            keep = self._held_back(buf, tail, words, longest)
            if tail:
                yield from self.encode(buf[:tail], allowed_special, ())
            yield from self._encode_words(buf[s:e] for s, e in words[:keep])
            if keep < len(words):
                start = words[keep][0]
            else:  # (only custom patterns leave text outside every word)
                start = words[-1][1] if words else tail
            seen = (seen + buf[:start])[-longest:] if longest else ""
            carry = buf[start:]
        if carry:
            yield from self.encode(carry, allowed_special, disallowed_special)

    def _partial_start(self, buf: str, lo: int, longest: int) -> int:
        """Start of the longest suffix of buf[lo:] that is a proper prefix of a special token, else len."""
        for k in range(min(longest - 1, len(buf) - lo), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.special_tokens):
                return len(buf) - k
        return len(buf)

    def _held_back(self, buf: str, tail: int, words: list[tuple[int, int]], longest: int) -> int:
        """How many of `words` (the buffer's words after `tail`) are final."""
        cut = words[-2][0] if len(words) >= 2 else tail
        partial = self._partial_start(buf, tail, longest)
        if partial < len(buf):
            # If this special token completes, the ordinary text ends where it starts, which can
            # change how the words just before it split: hold those back too.
            alone = [m.start() for m in self._pat.finditer(buf, tail, partial)]
            cut = min(cut, alone[-2] if len(alone) >= 2 else tail)
        return sum(1 for _, e in words if e <= cut)

    def encode_batch(self, texts: list[str], workers: int | None = None, allowed_special=(),
                     disallowed_special="all") -> list[list[int]]:
        """encode() of each text, spread over `workers` processes (default: all cores)."""
        workers = workers or os.cpu_count() or 1
        if workers <= 1 or len(texts) < 2:
            return [self.encode(t, allowed_special, disallowed_special) for t in texts]
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        args = (allowed_special, disallowed_special)
        chunk = max(1, len(texts) // (workers * 4))
        with ctx.Pool(workers, initializer=_set_worker, initargs=(self, args)) as pool:
            return pool.map(_encode_worker, texts, chunksize=chunk)

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as e:
            raise TokenizerError(f"token id {e.args[0]} is not in the vocab (size {len(self.vocab)})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (never raises on them)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> bytes:
        return self.vocab[i]

    def __repr__(self) -> str:
        name = pattern_name(self.pattern) or "custom"
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, pattern={name}, "
                f"specials={list(self.special_tokens)}, backend={self.backend}, hash={self.hash})")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tiktoken"] = None
        state.pop("_pat", None)
        state.pop("_split", None)
        state.pop("_fast_encode", None)
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pat = regex.compile(self.pattern)
        self._split = _native.splitter(self.pattern) or self._pat.findall
        self._fast_encode = _native.word_encoder(self.pattern)
        if self.backend == "tiktoken":
            self._tiktoken = self.to_tiktoken()


_WORKER: dict = {}


def _set_worker(tok: Tokenizer, args: tuple) -> None:
    _WORKER["tok"], _WORKER["args"] = tok, args


def _encode_worker(text: str) -> list[int]:
    return _WORKER["tok"].encode(text, *_WORKER["args"])
