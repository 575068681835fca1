"""Gopher, C4 and FineWeb rules at their published thresholds, each side of each boundary."""

import random

import pytest

from lmforge.data.heuristics import (
    C4Quality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    _ngram_coverage,
    duplicates,
)
from lmforge.data.sources import Document


def verdict(step, text):
    out = step.filter(Document(text, "d"))
    return "keep" if out is True else out[1]


def rand_words(n, seed, length=5):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)]


def test_gopher_quality_word_count_and_stop_words():
    g = GopherQuality()
    assert verdict(g, " ".join(["the", "word"] * 25)) == "keep"  # exactly 50 words
    assert verdict(g, " ".join((["the", "word"] * 25)[:49])) == "too_few_words"
    assert verdict(g, " ".join(["the"] + ["word"] * 49)) == "stop_words"  # one stop word < 2
    assert verdict(g, " ".join(["the", "and"] + ["word"] * 48)) == "keep"
    assert verdict(GopherQuality(GopherQuality.Config(max_words=60)), " ".join(["the", "word"] * 31)) == "too_many_words"


def test_gopher_quality_mean_word_length_and_symbols():
    g = GopherQuality()
    assert verdict(g, " ".join(["the", "cat"] * 25)) == "keep"  # mean 3.0 exactly
    assert verdict(g, " ".join(["the", "cat"] * 24 + ["the", "at"])) == "short_mean_word_length"
    long = "abcdefghijk"  # 11 letters: with 'the' mean (3+11)/2 = 7
    assert verdict(g, " ".join(["the", long] * 25)) == "keep"
    assert verdict(g, " ".join(["to", "abcdefghijklmnopqrst"] * 25)) == "long_mean_word_length"  # mean 11
    words = ["the", "word"] * 25
    for i in range(5):
        words[2 * i + 1] = "#word"  # 5 hashes / 50 words = 0.1: at the limit
    assert verdict(g, " ".join(words)) == "keep"
    words[11] = "#word"
    assert verdict(g, " ".join(words)) == "hash_ratio"


def test_gopher_quality_alpha_bullets_ellipsis():
    g = GopherQuality()
    base = ["the", "word"] * 25
    w = base[:]
    for i in range(10):
        w[2 * i + 1] = "1234"  # 40/50 = 0.8 alphabetic words: at the limit
    assert verdict(g, " ".join(w)) == "keep"
    w[21] = "1234"
    assert verdict(g, " ".join(w)) == "alpha_words"
    lines = [" ".join(base[i:i + 5]) for i in range(0, 50, 5)]  # 10 lines
    assert verdict(g, "\n".join("- " + ln if i < 9 else ln for i, ln in enumerate(lines))) == "keep"  # 0.9
    assert verdict(g, "\n".join("- " + ln for ln in lines)) == "bullet_lines"
    assert verdict(g, "\n".join(ln + " …" if i < 3 else ln for i, ln in enumerate(lines))) == "keep"  # 0.3
    assert verdict(g, "\n".join(ln + " …" if i < 4 else ln for i, ln in enumerate(lines))) == "ellipsis_lines"


def test_gopher_repetition_lines_and_paragraphs():
    r = GopherRepetition()
    unique = [" ".join(rand_words(12, seed=i)) for i in range(7)]
    assert verdict(r, "\n".join(unique + ["ok"] * 4)) == "keep"  # 3 duplicate lines / 11 = 0.27
    assert verdict(r, "\n".join(unique + ["ok"] * 5)) == "dup_line_frac"  # 4 / 12 = 0.33
    # One of 4 equal-length lines repeated: 1/4 = 0.25 of lines passes, ~25% of characters does not.
    assert verdict(r, "\n".join(unique[:3] + [unique[0]])) == "dup_line_char_frac"
    paras = [" ".join(rand_words(12, seed=100 + i)) for i in range(3)]
    assert verdict(r, "\n\n".join(paras + [paras[0]])) == "dup_para_char_frac"  # same, for paragraphs
    assert verdict(r, "\n\n".join(paras + [paras[0], paras[1]])) == "dup_para_frac"  # 2/5 = 0.4


def test_ngram_coverage_hand_computed():
    words = ["aa", "bb", "cc", "aa", "bb"]
    # bigrams: (aa,bb)x2, (bb,cc), (cc,aa): top = 2 chars+2 chars, twice = 8 of 10 word chars;
    # words inside a repeated bigram: positions 0,1,3,4 = 8 chars.
    assert _ngram_coverage(words, 2) == (0.8, 0.8)
    assert _ngram_coverage(words, 3) == (0.0, 0.0)
    assert duplicates(["a", "bb", "a", "bb", "a"]) == (3, 4)
    text = " ".join(words)
    assert verdict(GopherRepetition(GopherRepetition.Config(top_ngram_frac=[(2, 0.8)], dup_ngram_frac=[])), text) == "keep"
    assert verdict(GopherRepetition(GopherRepetition.Config(top_ngram_frac=[(2, 0.79)], dup_ngram_frac=[])), text) == "top_2gram"


def sentence(i):
    return " ".join(rand_words(6, seed=1000 + i)) + "."


def test_c4_lines_and_sentences():
    c4 = C4Quality()
    keep = [sentence(i) for i in range(5)]
    doc = Document("\n".join(keep + ["no terminal punctuation here", "Too short.",
                                     "Please enable javascript to view this page.",
                                     "Read our privacy policy for details today."]), "d")
    assert c4.filter(doc) is True
    assert doc.text == "\n".join(keep)  # every bad line removed, good lines kept in order
    assert c4.stats.counters["lines_removed"] == 4
    assert verdict(C4Quality(), "\n".join(keep[:4])) == "too_few_sentences"
    assert verdict(C4Quality(), "\n".join(keep) + "\nLorem ipsum dolor sit amet.") == "lorem_ipsum"
    assert verdict(C4Quality(), "\n".join(keep) + "\nfunction f() { return 1; }.") == "curly_bracket"
    cited = Document("\n".join(keep[:4] + ["Water boils at sea level[1] and more[citation needed]."]), "d")
    assert C4Quality().filter(cited) is True and "[1]" not in cited.text and "[citation" not in cited.text


def fw_line(i, punct=True):
    return " ".join(rand_words(7, seed=2000 + i)) + ("." if punct else "")


@pytest.mark.parametrize("n_punct,expected", [(3, "keep"), (2, "line_punct_ratio")])
def test_fineweb_punctuation_ratio(n_punct, expected):
    lines = [fw_line(i, punct=i < n_punct) for i in range(25)]  # 3/25 = 0.12 is the limit
    assert verdict(FineWebQuality(), "\n".join(lines)) == expected


def test_fineweb_short_lines_duplicates_and_lists():
    fw = FineWebQuality()
    long = [fw_line(i) for i in range(3)]
    short = [f"Short line {i}." for i in range(7)]
    assert verdict(fw, "\n".join(long[:1] + short[:2])) == "keep"  # 2/3 = 0.667 <= 0.67
    assert verdict(fw, "\n".join(long + short)) == "short_line_ratio"  # 7/10
    body = [fw_line(i) for i in range(60)]
    assert verdict(fw, "\n".join(body)) == "keep"
    assert verdict(fw, "\n".join(body + [body[0]])) == "char_dup_ratio"  # ~1.6% of chars duplicated
    assert verdict(FineWebQuality(FineWebQuality.Config(max_dup_line_char_ratio=0.02)),
                   "\n".join(body + [body[0]])) == "keep"
    words = " ".join(rand_words(29, seed=5)) + "."
    lenient = FineWebQuality(FineWebQuality.Config(max_short_line_ratio=1.0))
    assert verdict(lenient, words + "\n" * 9 + "End.") == "keep"  # 9 newlines / 30 words = 0.3
    assert verdict(lenient, words + "\n" * 10 + "End.") == "list_ratio"  # 10 / 30


def test_length_and_whitespace_steps():
    from lmforge.data.heuristics import LengthFilter, NormalizeWhitespace

    f = LengthFilter(LengthFilter.Config(min_chars=3, max_chars=5))
    assert [verdict(f, t) for t in ("ab", "abc", "abcde", "abcdef")] == ["too_short", "keep", "keep", "too_long"]
    n = NormalizeWhitespace()
    assert n.process(Document("a  \n\n\n\nb \n", "x")).text == "a\n\nb"
    assert n.process(Document(" \n \n", "y")) is None and n.stats.counters == {"docs_emptied": 1}


def test_c4_bad_words_list_whole_words_case_insensitive(tmp_path):
    from lmforge.errors import DataError

    words = tmp_path / "bad.txt"
    words.write_text("darn\nheck off\n\n")
    keep = [sentence(i) for i in range(5)]
    c4 = C4Quality(C4Quality.Config(bad_words_file=str(words)))
    assert verdict(c4, "\n".join(keep) + "\nWell, DARN it all.") == "bad_words"
    assert verdict(c4, "\n".join(keep) + "\nThey said heck off, loudly.") == "bad_words"
    # Whole words only: 'darning' and 'heck' alone are not on the list.
    assert verdict(c4, "\n".join(keep) + "\nShe was darning socks, heck.") == "keep"
    assert verdict(C4Quality(), "\n".join(keep) + "\nWell, darn it all.") == "keep"  # no list: rule off
    with pytest.raises(DataError, match="missing.txt"):
        C4Quality(C4Quality.Config(bad_words_file=str(tmp_path / "missing.txt"))).filter(Document("x.", "d"))
