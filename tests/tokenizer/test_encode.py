"""Encoding: round trips, special tokens, streaming, batches, and the tiktoken backend."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer
from tests.tokenizer.conftest import MULTILINGUAL


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_random_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text, disallowed_special=())
    assert small_tokenizer.decode(ids) == text
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=60))
def test_decode_random_bytes_never_raises(small_tokenizer, data):
    ids = [small_tokenizer.byte_ids[b] for b in data]
    assert small_tokenizer.decode_bytes(ids) == data
    assert small_tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


def test_round_trip_real_text(small_tokenizer, code, prose):
    for text in (code, prose, MULTILINGUAL):
        ids = small_tokenizer.encode(text)
        assert small_tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # it compresses


def test_reference_encoder_matches_merge_definition(small_tokenizer):
    # Encoding a word = replaying the merges in order on its bytes (the BPE definition).
    from lmforge.tokenizer.train import merge_word

    for word in ["    def", " return", "Größenwahn", "___init__", " 12345"]:
        ids = tuple(word.encode("utf-8"))
        for a, b, new in small_tokenizer.merges:
            ids = merge_word(ids, a, b, new)
        assert small_tokenizer._encode_word(word.encode("utf-8")) == list(ids)


def test_surrogates_encode_like_tiktoken(small_tokenizer):
    text = "a\ud800b"
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == "a\ufffdb"


def test_special_tokens_allowed_and_disallowed():
    tok = Tokenizer.from_merges([(104, 105)], ["<|endoftext|>", "<|end|>", "<|endoftext|>x"], "gpt2")
    eot, end, eotx = (tok.special_tokens[s] for s in ("<|endoftext|>", "<|end|>", "<|endoftext|>x"))
    text = "hi<|endoftext|>hi<|end|>"
    with pytest.raises(TokenizerError, match="<\\|endoftext\\|>"):
        tok.encode(text)  # tiktoken's default: every special token is disallowed
    assert tok.encode(text, allowed_special="all") == [256, eot, 256, end]
    # allowed only <|end|>: <|endoftext|> is still disallowed
    with pytest.raises(TokenizerError):
        tok.encode(text, allowed_special={"<|end|>"})
    # allowed <|end|>, nothing disallowed: <|endoftext|> becomes ordinary text
    ids = tok.encode(text, allowed_special={"<|end|>"}, disallowed_special=())
    assert ids[-1] == end and eot not in ids and tok.decode(ids) == text
    # overlaps: the longest special token at the leftmost position wins
    assert tok.encode("<|endoftext|>x<|end|>", allowed_special="all") == [eotx, end]
    assert tok.encode("<|endoftext|>y", allowed_special="all") == [eot, ord("y")]
    with pytest.raises(TokenizerError, match="unknown special"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_decode_invalid_utf8_and_bad_ids(small_tokenizer):
    ids = [small_tokenizer.byte_ids[0xE6], small_tokenizer.byte_ids[0x97]]  # truncated 3-byte char
    assert small_tokenizer.decode(ids) == "\ufffd"
    with pytest.raises(TokenizerError, match="not in the vocab"):
        small_tokenizer.decode([small_tokenizer.vocab_size])


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, max(1, len(text) // 7))))
    return [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]


@pytest.fixture(scope="module")
def gpt4_tokenizer(code):
    from lmforge.tokenizer import train_bpe

    return train_bpe([code, MULTILINGUAL], 400, pattern="gpt4", special_tokens=["<|endoftext|>", "<|pad|>"],
                     workers=1)


@settings(max_examples=250, deadline=None)
@given(st.lists(st.sampled_from(list("ab '\n\t\r1!<|>endoftxL\u00a0") + ["<|endoftext|>", "<|pad|>", "'ll", "  "]),
                min_size=2, max_size=40).map("".join), st.integers(0, 1000))
def test_encode_iterable_equals_encode(small_tokenizer, gpt4_tokenizer, text, seed):
    chunks = _random_chunks(text, random.Random(seed))
    for pattern_tok in (small_tokenizer, gpt4_tokenizer):
        expected = pattern_tok.encode(text, allowed_special="all")
        assert list(pattern_tok.encode_iterable(chunks, allowed_special="all")) == expected
        expected = pattern_tok.encode(text, disallowed_special=())
        assert list(pattern_tok.encode_iterable(chunks, disallowed_special=())) == expected


def test_encode_iterable_gpt4_pattern(code):
    from lmforge.tokenizer import train_bpe

    tok = train_bpe([code], 400, pattern="gpt4", workers=1)
    rng = random.Random(0)
    text = code[:20000] + MULTILINGUAL + "\n\n\n  \r\n x'LL 1234567"
    assert list(tok.encode_iterable(_random_chunks(text, rng))) == tok.encode(text)


def test_encode_iterable_memory_is_bounded(small_tokenizer, code):
    lines = code.splitlines(keepends=True)
    n_lines = 6_000  # ~0.24 MB of text, streamed line by line

    def stream():
        for i in range(n_lines):
            yield lines[i % len(lines)]

    total_chars = sum(len(lines[i % len(lines)]) for i in range(n_lines))
    small_tokenizer.encode(code)  # warm the word cache so it does not count as streaming memory
    tracemalloc.start()
    n_ids = 0
    for _ in small_tokenizer.encode_iterable(stream()):
        n_ids += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n_ids > total_chars / 10
    assert peak < 50_000 and total_chars > 200_000  # the text alone, or its ids as a list, take megabytes


def test_encode_batch_across_processes(small_tokenizer, code, prose):
    texts = [code[:3000], prose[:3000], MULTILINGUAL, "", "x<|pad|>y"]
    expected = [small_tokenizer.encode(t, allowed_special="all") for t in texts]
    assert small_tokenizer.encode_batch(texts, workers=2, allowed_special="all") == expected


def test_tiktoken_backend_equals_reference(small_tokenizer, code, prose):
    pytest.importorskip("tiktoken")
    fast = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, small_tokenizer.special_tokens,
                     small_tokenizer.pattern, backend="tiktoken")
    assert fast.backend == "tiktoken"
    for text in (code, prose, MULTILINGUAL, "<|endoftext|>a<|pad|>"):
        assert fast.encode(text, allowed_special="all") == small_tokenizer.encode(text, allowed_special="all")
    with pytest.raises(TokenizerError):
        fast.encode("<|pad|>")


def test_encode_iterable_edge_cases(small_tokenizer):
    # a disallowed special token split across chunks is still caught
    with pytest.raises(TokenizerError, match="endoftext"):
        list(small_tokenizer.encode_iterable(["abc <|endof", "text|> def"]))
    # the GPT-2 pattern splits "\n\n'll" as "\n", "\n", "'ll": a cut after "\n\n" must not merge them
    chunks = ["\n\n'", "l", "l"]
    assert list(small_tokenizer.encode_iterable(chunks)) == small_tokenizer.encode("".join(chunks))
    # a custom pattern that leaves text outside every word (dropped, as findall drops it)
    tok = Tokenizer.from_merges([(97, 98)], [], pattern=r"ab|c")
    assert list(tok.encode_iterable(["xa", "bxc", "a", "b"])) == tok.encode("xabxcab") == [256, 99, 256]


def test_encode_iterable_overlapping_specials():
    # "<|end" is itself a special token and a prefix of "<|endoftext|>": a complete "<|end" at the end
    # of a chunk is not final, since the next chunk can complete the longer token.
    tok = Tokenizer.from_merges([(97, 98)], ["<|endoftext|>", "<|end"], "gpt2")
    chunks = ["\tt1\r\n<|endo", "ftext|", ">n<|end", "x"]
    text = "".join(chunks)
    expected = tok.encode(text, allowed_special="all")
    assert expected.count(tok.special_tokens["<|endoftext|>"]) == 1
    assert expected.count(tok.special_tokens["<|end"]) == 1
    assert list(tok.encode_iterable(chunks, allowed_special="all")) == expected
    with pytest.raises(TokenizerError, match="<\\|end"):
        list(tok.encode_iterable(chunks, allowed_special={"<|endoftext|>"}))


def _pure(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer on the pure-Python encoding path (regex split, Python word loop)."""
    pure = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern)
    pure._split, pure._fast_encode = pure._pat.findall, None
    return pure


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=50))
def test_c_word_loop_equals_pure_python(small_tokenizer, gpt4_tokenizer, text):
    for tok in (small_tokenizer, gpt4_tokenizer):
        assert tok.encode_ordinary(text) == _pure(tok).encode_ordinary(text)


def test_c_word_loop_equals_pure_python_real_text(small_tokenizer, gpt4_tokenizer, code, prose):
    for tok in (small_tokenizer, gpt4_tokenizer):
        pure = _pure(tok)
        for text in (code, prose[:50_000], MULTILINGUAL, "a\ud800b  \n\n"):
            assert tok.encode_ordinary(text) == pure.encode_ordinary(text)
