"""Generative tasks: answer extraction on tricky strings, the pass@k estimator against exhaustive
enumeration, majority voting, and the engine-driven evaluation end to end."""

import itertools
import json
from math import comb

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.eval.generative import (
    GenItem,
    evaluate_generative,
    extract_letter,
    extract_number,
    load_gsm8k,
    majority_vote,
    normalize_text,
    pass_at_k,
)
from lmforge.inference import Engine, SamplingParams

from .helpers import byte_tokenizer, tiny_model


@pytest.mark.parametrize("text,want", [
    ("so she has 1,234 apples.", "1234"),
    ("The total is $1,000,000.50 in the end", "1000000.5"),
    ("It drops to -7 degrees, then -12.", "-12"),
    ("3 + 4 = 7. Then 7 * 2 = 14 apples and some trailing text", "14"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,080", "1080"),
    ("the list 1,2,3", "3"),
    ("answer: 5, then we stop", "5"),
    ("10.0", "10"),
    ("costs .5 dollars", "0.5"),
    ("no digits here", None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize("text,want", [
    (" B", "B"), ("The answer is (C).", "C"), ("answer: d because", "D"), ("I think (A) is right", "A"),
    ("Because of reasons", None), (" E", None), ("A. 3", "A"),
])
def test_extract_letter(text, want):
    assert extract_letter(text, 4) == want


def test_normalize_text():
    assert normalize_text("  The Eiffel   Tower!") == normalize_text("eiffel tower") == "eiffel tower"


@pytest.mark.parametrize("n,c", [(5, 0), (5, 2), (6, 3), (7, 7), (4, 1)])
def test_pass_at_k_equals_enumeration(n, c):
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        hits = sum(any(i < c for i in s) for s in subsets)  # samples 0..c-1 are the correct ones
        assert pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ConfigError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    assert majority_vote([None, "5", None, None]) == "5"
    assert majority_vote([None]) is None


def test_load_gsm8k(tmp_path):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i:,}"} for i in range(600, 604)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_gsm8k(p, num_fewshot=1)
    assert len(items) == 3 and items[0].answer == "1202"
    assert items[0].prompt == ("Question: What is 600+600?\nAnswer: 600+600=1200\n#### 1,200\n\n"
                               "Question: What is 601+601?\nAnswer:")
    p.write_text(json.dumps({"question": "q", "answer": "no marker"}))
    with pytest.raises(DataError, match="####"):
        load_gsm8k(p)


def _engine():
    tok = byte_tokenizer()
    return Engine(tiny_model(context=40, dtype=torch.float32), tokenizer=tok, max_batch=4, max_len=40), tok


def test_generative_end_to_end():
    engine, tok = _engine()
    prompts = ["Q: 1+1?\nA:", "Q: 2+2?\nA:", "Q: 9-3?\nA:"]
    greedy = engine.generate([[256] + list(p.encode()) for p in prompts],
                             SamplingParams(max_tokens=12, temperature=0, stop=["7"]))
    texts = [g[0].text for g in greedy]
    assert all("7" not in t for t in texts)
    # gold = exactly what greedy decoding says for items 0 and 2, something else for item 1
    golds = [normalize_text(texts[0]), normalize_text(texts[1]) + " extra", normalize_text(texts[2])]
    items = [GenItem(p, g) for p, g in zip(prompts, golds)]
    res = evaluate_generative(engine, tok, items, extractor="exact", max_tokens=12, stop=["7"])
    assert res["accuracy"] == pytest.approx(2 / 3) and res["pass@1"] == pytest.approx(2 / 3)
    assert [d["texts"][0] for d in res["items"]] == texts
    # sampled: pass@k and maj@n are consistent with the per-sample answers the report gives
    res = evaluate_generative(engine, tok, items, extractor="exact", n=4, temperature=1.0, max_tokens=3,
                              seed=5, ks=[1, 2, 4])
    for k in (1, 2, 4):
        want = sum(pass_at_k(4, sum(a == d["gold"] for a in d["answers"]), k) for d in res["items"]) / 3
        assert res[f"pass@{k}"] == pytest.approx(want)
    assert res["maj@4"] == pytest.approx(sum(majority_vote(d["answers"]) == d["gold"] for d in res["items"]) / 3)
    again = evaluate_generative(engine, tok, items, extractor="exact", n=4, temperature=1.0, max_tokens=3,
                                seed=5, ks=[1, 2, 4])
    assert [d["texts"] for d in again["items"]] == [d["texts"] for d in res["items"]]  # seeded
    with pytest.raises(ConfigError, match="temperature"):
        evaluate_generative(engine, tok, items, n=2)
    # a prompt longer than the engine's cache keeps its end and still gets an answer
    long = evaluate_generative(engine, tok, [GenItem("x" * 100 + prompts[0], golds[0])], extractor="exact",
                               max_tokens=12, stop=["7"])
    ref = engine.generate([([256] + list(("x" * 100 + prompts[0]).encode()))[-28:]],
                          SamplingParams(max_tokens=12, temperature=0, stop=["7"]))[0][0]
    assert long["items"][0]["texts"] == [ref.text]
