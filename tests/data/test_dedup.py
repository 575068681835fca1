"""Exact, line and Bloom dedup; the Bloom filter's measured false-positive rate."""

import math

import pytest

from lmforge.data.dedup import BloomDedup, BloomFilter, normalize
from lmforge.data.sources import Document


@pytest.mark.parametrize("fp_rate", [0.01, 0.001])
def test_bloom_false_positive_rate_within_2x(fp_rate):
    n = 20_000
    bloom = BloomFilter(n, fp_rate)
    assert bloom.m == math.ceil(-n * math.log(fp_rate) / math.log(2) ** 2)
    assert bloom.k == round(bloom.m / n * math.log(2))
    for i in range(n):
        bloom.add(f"item-{i}")
    assert all(f"item-{i}" in bloom for i in range(0, n, 7))  # no false negatives
    trials = 40_000
    fp = sum(f"other-{i}" in bloom for i in range(trials)) / trials
    assert fp_rate / 2 <= fp <= 2 * fp_rate, fp


def test_bloom_dedup_removes_repeated_paragraphs_within_task():
    step = BloomDedup(BloomDedup.Config(unit="paragraph", capacity=1000, fp_rate=1e-6))
    docs = [Document("intro one\n\nshared footer", "a"), Document("intro two\n\nshared footer", "b"),
            Document("shared footer", "c")]
    out = list(step.run(iter(docs)))
    assert [(d.id, d.text) for d in out] == [("a", "intro one\n\nshared footer"), ("b", "intro two")]
    assert step.stats.counters == {"paragraphs_removed": 2, "docs_emptied": 1}
    step.start(1)  # a new task starts with an empty filter
    assert step.process(Document("shared footer", "d")).text == "shared footer"


def test_normalize_states_each_rule():
    assert normalize("  Héllo,   WORLD!\n Çà  ") == "hello world ca"
    assert normalize("Héllo, World", lowercase=False, accents=False) == "Héllo World"
    assert normalize("a-b", punctuation=True) == "a b"


def test_exact_dedup_plan_is_the_same_for_any_partition_count(tmp_path):
    import random

    from lmforge.data.dedup import ExactDedup

    rng = random.Random(0)
    tasks = [[Document(f"doc {rng.randrange(40)}", f"{r}-{i}") for i in range(rng.randrange(20, 50))]
             for r in range(3)]
    # Reference: first occurrence in (task, position) order survives.
    seen, expected = set(), []
    for docs in tasks:
        keep = []
        for d in docs:
            keep.append(d.text not in seen)
            seen.add(d.text)
        expected.append({i for i, k in enumerate(keep) if not k})
    for partitions in (1, 7):
        step = ExactDedup(ExactDedup.Config(partitions=partitions))
        step.workdir = tmp_path / f"p{partitions}"
        for r, docs in enumerate(tasks):
            assert list(step.observe(iter(docs), r, 3)) == docs  # observe passes documents through
        step.plan(3)
        assert [set(step.drops_for(r)) for r in range(3)] == expected
