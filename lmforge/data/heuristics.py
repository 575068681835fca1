"""Heuristic quality rules with their published thresholds as defaults, each drop with its reason.

- `gopher_quality`: Rae et al. 2021 (Gopher, appendix A.1.1): 50-100,000 words, mean word length
  3-10, symbol-to-word ratio ≤ 0.1 for '#' and for ellipses, ≤ 90% of lines starting with a bullet,
  ≤ 30% of lines ending with an ellipsis, ≥ 80% of words with an alphabetic character, and at least
  2 of the stop words {the, be, to, of, and, that, have, with}.
- `gopher_repetition`: Gopher table A1: duplicate-line fraction ≤ 0.30 and characters in duplicate
  lines ≤ 0.20; the same for paragraphs; the most frequent 2/3/4-gram covers ≤ 0.20/0.18/0.16 of the
  characters; duplicated 5..10-grams cover ≤ 0.15, 0.14, 0.13, 0.12, 0.11, 0.10.
- `c4`: Raffel et al. 2020 (C4): keep lines that end in terminal punctuation, have ≥ 3 words and no
  word longer than 1000 characters, and don't mention javascript or cookie/privacy/terms policies;
  then drop documents with < 5 sentences, 'lorem ipsum', a curly bracket, or (given a word list
  file, as C4 used LDNOOBW's, which is not bundled) any listed word.
- `fineweb`: Penedo et al. 2024 (FineWeb's extra rules): ≥ 12% of lines end in punctuation, ≤ 67%
  of lines are ≤ 30 characters, ≤ 1% of characters are in duplicated lines, newlines/words ≤ 0.3.

Words are whitespace-separated tokens (as in Gopher); n-gram character counts are over word
characters. Reasons are the rule names (e.g. `too_few_words`, `dup_line_frac`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from lmforge.data.pipeline import Filter, PipelineStep, register
from lmforge.data.sources import Document
from lmforge.errors import DataError

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "–")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "”", "’", "'", "…", ":", ";", ")", "]")
C4_TERMINAL = (".", "!", "?", '"')
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
             "use cookies")
_PUNCT_ONLY = re.compile(r"^[^\w]+$")


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, total characters of those items)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


@register("gopher_quality")
class GopherQuality(Filter):
    @dataclasses.dataclass
    class Config:
        min_words: int = 50
        max_words: int = 100_000
        min_mean_word_length: float = 3.0
        max_mean_word_length: float = 10.0
        max_symbol_word_ratio: float = 0.1
        max_bullet_lines_ratio: float = 0.9
        max_ellipsis_lines_ratio: float = 0.3
        min_alpha_words_ratio: float = 0.8
        min_stop_words: int = 2

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        c = self.cfg
        words = doc.text.split()
        # Gopher counts length and word length on words, not on stray punctuation tokens.
        content = [w for w in words if not _PUNCT_ONLY.match(w)]
        if len(content) < c.min_words:
            return False, "too_few_words"
        if len(content) > c.max_words:
            return False, "too_many_words"
        mean_len = sum(map(len, content)) / len(content)
        if mean_len < c.min_mean_word_length:
            return False, "short_mean_word_length"
        if mean_len > c.max_mean_word_length:
            return False, "long_mean_word_length"
        if doc.text.count("#") / len(words) > c.max_symbol_word_ratio:
            return False, "hash_ratio"
        if sum(doc.text.count(e) for e in ELLIPSES) / len(words) > c.max_symbol_word_ratio:
            return False, "ellipsis_ratio"
        lines = [ln for ln in doc.text.splitlines() if ln.strip()]
        if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines_ratio:
            return False, "bullet_lines"
        if sum(ln.rstrip().endswith(ELLIPSES) for ln in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return False, "ellipsis_lines"
        if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < c.min_alpha_words_ratio:
            return False, "alpha_words"
        if sum(w.lower() in STOP_WORDS for w in words) < c.min_stop_words:
            return False, "stop_words"
        return True


def _ngram_coverage(words: list[str], n: int) -> tuple[float, float]:
    """(chars of the most frequent n-gram × its count, chars of words inside any repeated n-gram),
    both as fractions of all word characters."""
    total = sum(map(len, words))
    if total == 0 or len(words) < n:
        return 0.0, 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top, top_count = counts.most_common(1)[0]
    top_frac = (sum(map(len, top)) * top_count / total) if top_count > 1 else 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    dup_frac = sum(len(w) for w, c in zip(words, covered) if c) / total
    return top_frac, dup_frac


@register("gopher_repetition")
class GopherRepetition(Filter):
    @dataclasses.dataclass
    class Config:
        dup_line_frac: float = 0.30
        dup_para_frac: float = 0.30
        dup_line_char_frac: float = 0.20
        dup_para_char_frac: float = 0.20
        top_ngram_frac: list[tuple[int, float]] = dataclasses.field(
            default_factory=lambda: [(2, 0.20), (3, 0.18), (4, 0.16)])
        dup_ngram_frac: list[tuple[int, float]] = dataclasses.field(
            default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        c = self.cfg
        text = doc.text
        if not text.strip():
            return False, "empty"
        paras = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        n, chars = duplicates(paras)
        if n / len(paras) > c.dup_para_frac:
            return False, "dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        n, chars = duplicates(lines)
        if n / len(lines) > c.dup_line_frac:
            return False, "dup_line_frac"
        if chars / len(text) > c.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = text.split()
        for n_, limit in c.top_ngram_frac:
            if _ngram_coverage(words, n_)[0] > limit:
                return False, f"top_{n_}gram"
        for n_, limit in c.dup_ngram_frac:
            if _ngram_coverage(words, n_)[1] > limit:
                return False, f"dup_{n_}gram"
        return True


_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.IGNORECASE)


@register("c4")
class C4Quality(Filter):
    """C4's line filters (which rewrite the document) followed by its document filters."""

    @dataclasses.dataclass
    class Config:
        min_words_per_line: int = 3
        max_word_length: int = 1000
        min_sentences: int = 5
        remove_citations: bool = True
        drop_javascript_lines: bool = True
        drop_policy_lines: bool = True
        drop_lorem_ipsum: bool = True
        drop_curly_bracket: bool = True
        # C4 dropped pages containing any word of the LDNOOBW English list. The list is not bundled:
        # give a UTF-8 file with one word or phrase per line to apply the rule.
        bad_words_file: str | None = None

    _bad_words: re.Pattern | None = None

    def bad_words(self) -> re.Pattern | None:
        """Whole-word, case-insensitive matcher for the configured bad-words list (read once)."""
        path = self.cfg.bad_words_file
        if path is None:
            return None
        if self._bad_words is None:
            try:
                with open(path, encoding="utf-8") as f:
                    words = sorted({w.strip().lower() for w in f if w.strip()}, key=len, reverse=True)
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"c4.bad_words_file {path}: cannot read a UTF-8 word list: {e}") from None
            if not words:
                raise DataError(f"c4.bad_words_file {path}: the word list is empty")
            self._bad_words = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)")
        return self._bad_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        c = self.cfg
        if c.drop_lorem_ipsum and "lorem ipsum" in doc.text.lower():
            return False, "lorem_ipsum"
        if c.drop_curly_bracket and "{" in doc.text:
            return False, "curly_bracket"
        bad = self.bad_words()
        if bad is not None and bad.search(doc.text.lower()):
            return False, "bad_words"
        kept = []
        for line in doc.text.split("\n"):
            line = line.strip()
            if c.remove_citations:
                line = _CITATION.sub("", line)
            words = line.split()
            lower = line.lower()
            if (not line.endswith(C4_TERMINAL) or len(words) < c.min_words_per_line
                    or any(len(w) > c.max_word_length for w in words)
                    or (c.drop_javascript_lines and "javascript" in lower)
                    or (c.drop_policy_lines and any(p in lower for p in C4_POLICY))):
                self.stat("lines_removed")
                continue
            kept.append(line)
        text = "\n".join(kept)
        # Sentences: runs ending in terminal punctuation followed by space or end (C4 used NLTK).
        if len(re.findall(r"[^.!?]+[.!?]+(?=\s|$|\")", text)) < c.min_sentences:
            return False, "too_few_sentences"
        doc.text = text
        return True


@register("fineweb")
class FineWebQuality(Filter):
    @dataclasses.dataclass
    class Config:
        min_punct_line_ratio: float = 0.12
        max_short_line_ratio: float = 0.67
        short_line_length: int = 30
        max_dup_line_char_ratio: float = 0.01
        max_newline_word_ratio: float = 0.3

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        c = self.cfg
        lines = [ln for ln in doc.text.split("\n") if ln.strip()]
        if not lines:
            return False, "empty"
        if sum(ln.rstrip().endswith(TERMINAL_PUNCT) for ln in lines) / len(lines) < c.min_punct_line_ratio:
            return False, "line_punct_ratio"
        if sum(len(ln) <= c.short_line_length for ln in lines) / len(lines) > c.max_short_line_ratio:
            return False, "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(doc.text.replace("\n", ""))) > c.max_dup_line_char_ratio:
            return False, "char_dup_ratio"
        words = doc.text.split()
        if doc.text.count("\n") / max(1, len(words)) > c.max_newline_word_ratio:
            return False, "list_ratio"
        return True


@register("length")
class LengthFilter(Filter):
    """Keep documents with min_chars ≤ characters ≤ max_chars (0 = no upper bound)."""

    @dataclasses.dataclass
    class Config:
        min_chars: int = 1
        max_chars: int = 0

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) < self.cfg.min_chars:
            return False, "too_short"
        if self.cfg.max_chars and len(doc.text) > self.cfg.max_chars:
            return False, "too_long"
        return True


@register("normalize_whitespace")
class NormalizeWhitespace(PipelineStep):
    """Strip trailing spaces on lines and collapse 3+ blank lines to one blank line."""

    def process(self, doc: Document) -> Document:
        lines = [ln.rstrip() for ln in doc.text.split("\n")]
        doc.text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if not doc.text:
            self.stat("docs_emptied")
            return None
        return doc
