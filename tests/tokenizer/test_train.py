"""BPE training: a hand-worked example, and the reference, incremental and C paths agreeing."""

from __future__ import annotations

import random

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import TokenizerError
from lmforge.tokenizer import _native, train_bpe
from lmforge.tokenizer.pretokenize import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    chunk_texts,
    count_corpus,
    count_words,
    count_words_python,
)
from lmforge.tokenizer.train import train_merges, train_merges_incremental, train_merges_reference

needs_ext = pytest.mark.skipif(_native.module() is None, reason="C extension not built")

# Characters that exercise every branch of both patterns: letters (incl. ſ and K, which case-fold to
# ASCII s and k), digits of several scripts, the contraction letters, many kinds of whitespace,
# punctuation, CJK, emoji.
TRICKY = list("aZéſKk1٣½Ⅻ stlvredmSTLVREDM'\"!,.-_\t\n\r\u00a0\u2028\u3000\x85\x0b中😀") + [" ", " ", "\n"]


def test_hand_worked_merges():
    # "aaabdaaabac" is one word (all letters). Pairs: aa=4, ab=2, bd=da=ba=ac=1.
    # 1. (a,a) -> 256 "aa": word = [aa, a, b, d, aa, a, b, a, c]; pairs (aa,a)=2, (a,b)=2, rest 1.
    # 2. tie at 2: ("aa","a") > ("a","b") since "aa" > "a" -> (256, a) -> 257 "aaa":
    #    word = [aaa, b, d, aaa, b, a, c]; (aaa,b)=2.
    # 3. (257, b) -> 258 "aaab": word = [aaab, d, aaab, a, c]; four pairs tie at 1; the greatest first
    #    string is "d" ("d" > "aaab" > "a"), so
    # 4. (d, 258) -> 259 "daaab": word = [aaab, daaab, a, c]; greatest first string "daaab":
    # 5. (259, a) -> 260 "daaaba": word = [aaab, daaaba, c]; ("daaaba","c") > ("aaab","daaaba"):
    # 6. (260, c) -> 261, then 7. (258, 261) -> 262, and no pairs are left (8th merge not made).
    a, b, c, d = map(ord, "abcd")
    expected = [(a, a), (256, a), (257, b), (d, 258), (259, a), (260, c), (258, 261)]
    counts = count_words_python(["aaabdaaabac"], GPT2_PATTERN)
    assert train_merges_reference(counts, 8) == expected
    assert train_merges_incremental(counts, 8) == expected
    assert train_merges(counts, 8) == expected
    tok = train_bpe(["aaabdaaabac"], 256 + 8, special_tokens=[], workers=1)
    assert tok.vocab[262] == b"aaabdaaabac" and tok.vocab_size == 256 + 7


def test_special_tokens_are_never_merged_across():
    # Words: "ab" (before the special), " ab", "ab" (after the special) -> (a,b)=3, (" ",a)=1.
    # 1. (a,b) -> 256; 2. (" ", 256) -> 257. Without the special split, "<|" ... would form words.
    tok = train_bpe(["ab ab<|endoftext|>ab"], 260, special_tokens=["<|endoftext|>"], workers=1)
    assert [m[:2] for m in tok.merges] == [(97, 98), (32, 256)]
    assert tok.special_tokens == {"<|endoftext|>": 258}
    assert not any(b"<" in tok.vocab[i] for i in range(256, 258))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ab c\n'1é", max_size=30), min_size=1, max_size=8), st.integers(1, 25))
def test_incremental_and_c_equal_reference(texts, n_merges):
    counts = count_words_python(texts, GPT2_PATTERN)
    ref = train_merges_reference(counts, n_merges)
    assert train_merges_incremental(counts, n_merges) == ref
    assert train_merges(counts, n_merges) == ref


@needs_ext
def test_c_merges_equal_python_on_real_code(code):
    counts = count_words(code.split("\n\n"), GPT2_PATTERN)
    ext = _native.module()
    assert ext.train(list(counts), list(counts.values()), 700, None) == train_merges_incremental(counts, 700)


@needs_ext
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet=TRICKY, max_size=40), st.text(max_size=30)))
def test_c_word_counter_and_splitter_equal_regex(text):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert count_words([text], pattern) == count_words_python([text], pattern)
        assert _native.splitter(pattern)(text) == regex.findall(pattern, text)


@needs_ext
def test_c_word_counter_on_real_text(code, prose):
    from tests.tokenizer.conftest import MULTILINGUAL

    texts = [code, prose, MULTILINGUAL * 5]
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert count_words(texts, pattern, ["<|endoftext|>"]) == count_words_python(texts, pattern, ["<|endoftext|>"])


def test_lone_surrogates_count_as_replacement_character():
    text = "ab\ud800cd \udfff"
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        expected = count_words_python([text], pattern)
        assert expected == count_words_python(["ab\ufffdcd \ufffd"], pattern)
        assert count_words([text], pattern) == expected


def test_chunking_preserves_words(code):
    # Cutting long documents into chunks must not change any word.
    texts = [code, "x" * 10, code[: len(code) // 3]]
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        whole = count_words_python(texts, pattern)
        chunks = list(chunk_texts(texts, 5000, pattern=pattern))
        assert len(chunks) > 10
        parts = [t for chunk in chunks for t in chunk]
        assert "".join(parts) == "".join(texts)
        assert count_words_python(parts, pattern) == whole


def test_parallel_counting_equals_serial(code, prose):
    texts = [code, prose, code[::-1]]
    serial = count_corpus(texts, GPT2_PATTERN, workers=1, chunk_chars=20_000)
    parallel = count_corpus(texts, GPT2_PATTERN, workers=2, chunk_chars=20_000)
    assert parallel == serial == count_words_python(texts, GPT2_PATTERN)


def test_memory_budget_prunes_rare_words():
    rng = random.Random(0)
    words = [" common"] * 5000 + [" " + "".join(rng.choices("bcdfghjklmnpqrstvwxz", k=9)) for _ in range(3000)]
    rng.shuffle(words)
    texts = ["".join(words[i:i + 100]) for i in range(0, len(words), 100)]
    stats: dict = {}
    budget = 100_000
    counts = count_corpus(texts, GPT2_PATTERN, chunk_chars=3000, memory_budget=budget, stats=stats)
    assert stats["pruned_words"] > 0
    assert counts[b" common"] == 5000  # frequent words survive with exact counts
    from lmforge.tokenizer.pretokenize import _entry_bytes

    assert sum(_entry_bytes(w) for w in counts) <= budget // 3


def test_train_bpe_bad_input():
    with pytest.raises(TokenizerError, match="vocab_size must be at least 256 \\+ 1"):
        train_bpe(["abc"], 256, special_tokens=["<|endoftext|>"])
    with pytest.raises(TokenizerError, match="non-empty"):
        train_bpe(["abc"], 300, special_tokens=[""])
    with pytest.raises(TokenizerError, match="not a valid regex"):
        train_bpe(["abc"], 300, pattern="(unclosed")


def test_gpt4_pattern_and_custom_pattern_train():
    text = "DON'T stop 12345 numbers\n\n\tindent ok!!\n" * 20
    tok4 = train_bpe([text], 300, pattern="gpt4", special_tokens=[], workers=1)
    counts = count_words_python([text], GPT4_PATTERN)
    assert [m[:2] for m in tok4.merges] == train_merges_reference(counts, 44)
    assert b"123" in counts and b"45" in counts  # \p{N}{1,3}
    custom = r"\S+|\s+"
    tok = train_bpe([text], 280, pattern=custom, special_tokens=[], workers=1)
    assert tok.pattern == custom
    assert [m[:2] for m in tok.merges] == train_merges_reference(
        count_words_python([text], custom), 24)
    assert regex.compile(custom)  # sanity: the pattern kept is the one given


def test_pure_python_fallback_gives_same_tokenizer(tmp_path, code):
    # Without the extension (LMFORGE_PURE_PYTHON=1) training must give the same merges, and say so.
    import subprocess
    import sys

    script = (
        "import sys, logging; logging.basicConfig(level=logging.INFO)\n"
        "from lmforge.tokenizer import train_bpe, _native\n"
        "assert _native.module() is None\n"
        "tok = train_bpe([open(sys.argv[1]).read()], 400, workers=1)\n"
        "print(tok.hash)\n")
    src = tmp_path / "code.py"
    src.write_text(code)
    env = {**__import__("os").environ, "LMFORGE_PURE_PYTHON": "1"}
    res = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pure-Python" in res.stderr
    assert res.stdout.strip() == train_bpe([code], 400, workers=1).hash
