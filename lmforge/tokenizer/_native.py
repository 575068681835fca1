"""Loader for the optional C extension `_bpe_c` (built at install time by setuptools).

When the extension is missing (no compiler at install, or `LMFORGE_PURE_PYTHON=1`), everything falls
back to the pure-Python paths, which give identical results, and one log line says so.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)


@functools.cache
def module():
    """The C extension module, with its Unicode tables set, or None when unavailable."""
    if os.environ.get("LMFORGE_PURE_PYTHON"):
        log.info("LMFORGE_PURE_PYTHON is set: using the pure-Python BPE training paths")
        return None
    try:
        from lmforge.tokenizer import _bpe_c
    except ImportError:
        log.warning("lmforge C extension for BPE training is not built; using the pure-Python paths "
                    "(same results, slower). Reinstall with a C compiler to build it.")
        return None
    classes, folds = _unicode_tables()
    _bpe_c.set_tables(classes, folds)
    return _bpe_c


def _unicode_tables() -> tuple[bytes, list[tuple[int, int]]]:
    """Class bits per code point (1 = \\p{L}, 2 = \\p{N}, 4 = \\s) as the `regex` module sees them, and
    the non-ASCII code points that case-fold to the ASCII letters of the GPT-4 contractions."""
    import array

    import regex

    # every code point in one string, built without a million small str objects
    every = array.array("I", range(0x110000)).tobytes().decode("utf-32-le", "surrogatepass")
    table = bytearray(0x110000)
    for bit, cls in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        for m in regex.finditer(cls, every):
            for cp in range(m.start(), m.end()):
                table[cp] |= bit
    folds = []
    for letter in "sdmtlvre":
        for m in regex.finditer(f"(?i){letter}", every):
            cp = m.start()
            if cp >= 128:
                folds.append((cp, ord(letter)))
    return bytes(table), folds


def word_counter(pattern: str):
    """A function `count(pieces) -> {word bytes: count}` for a built-in pattern, or None when the
    pattern is custom or the extension is unavailable."""
    from lmforge.tokenizer.pretokenize import pattern_name, replace_surrogates

    name = pattern_name(pattern)
    ext = module()
    if ext is None or name is None:
        return None
    pid = {"gpt2": 1, "gpt4": 2}[name]

    def count(pieces) -> dict[bytes, int]:
        table = ext.table_new()
        for text in pieces:
            try:
                ext.count(table, pid, text)
            except UnicodeEncodeError:  # lone surrogates: count them the way the encoder sees them
                ext.count(table, pid, replace_surrogates(text))
        counts: dict[bytes, int] = {}
        ext.items(table, counts)
        return counts

    return count


def splitter(pattern: str):
    """A function `split(text) -> list[str]` equal to `regex.findall(pattern, text)` for a built-in
    pattern, or None when the pattern is custom or the extension is unavailable."""
    from lmforge.tokenizer.pretokenize import pattern_name

    name = pattern_name(pattern)
    ext = module()
    if ext is None or name is None:
        return None
    return functools.partial(ext.split, {"gpt2": 1, "gpt4": 2}[name])


def word_encoder(pattern: str):
    """A function `encode(text, cache, encode_word, limit) -> list[int]` that splits a text with a
    built-in pattern and looks each word up in `cache` (calling `encode_word(word)` on a miss), or
    None when the pattern is custom or the extension is unavailable."""
    from lmforge.tokenizer.pretokenize import pattern_name

    name = pattern_name(pattern)
    ext = module()
    if ext is None or name is None:
        return None
    return functools.partial(ext.encode, {"gpt2": 1, "gpt4": 2}[name])
