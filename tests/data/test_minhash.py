"""MinHash-LSH: fast path == reference == datasketch; near-duplicate licences found, distinct kept."""

import random

import numpy as np
import pytest

from lmforge.data.minhash import (
    UnionFind,
    fold32,
    jaccard,
    lsh_candidates,
    near_duplicates,
    permutations,
    shingle_hashes,
    signatures,
    signatures_reference,
)

MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""

BSD = """Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met: 1. Redistributions of source code must retain the
above copyright notice, this list of conditions and the following disclaimer. 2. Redistributions in
binary form must reproduce the above copyright notice, this list of conditions and the following
disclaimer in the documentation and/or other materials provided with the distribution. THIS
SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR
A PARTICULAR PURPOSE ARE DISCLAIMED."""


def random_doc(rng, n):
    vocab = [f"w{i}" for i in range(300)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_fast_signatures_equal_reference():
    rng = random.Random(0)
    docs = [random_doc(rng, n) for n in (0, 1, 3, 17, 40, 113)] + ["Ünïcödé, punctuation!"]
    sh = [shingle_hashes(d, 3) for d in docs]
    a, b = permutations(24, seed=7)
    ref = signatures_reference(sh, a, b)
    assert np.array_equal(signatures(sh, a, b), ref)
    assert np.array_equal(signatures(sh, a, b, chunk=5), ref)  # chunking does not change the result
    assert (ref[0] == 0xFFFFFFFF).all()  # empty document: no shingle


def test_signatures_equal_datasketch():
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(1)
    docs = [random_doc(rng, n) for n in (5, 30, 77)]
    a, b = permutations(32, seed=3)
    for doc, sig in zip(docs, signatures([shingle_hashes(d, 5) for d in docs], a, b)):
        m = datasketch.MinHash(num_perm=32, hashfunc=int, permutations=(a, b), scheme="affine32")
        m.update_batch([int(x) for x in fold32(shingle_hashes(doc, 5))])
        assert np.array_equal(m.hashvalues, sig)


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(2)
    base = random_doc(rng, 400).split()
    other = base[:300] + random_doc(rng, 100).split()
    x, y = shingle_hashes(" ".join(base), 5), shingle_hashes(" ".join(other), 5)
    a, b = permutations(512, seed=1)
    s = signatures([x, y], a, b)
    est = float((s[0] == s[1]).mean())
    true = jaccard(x, y)
    # 512 hashes: standard error sqrt(J(1-J)/512) ≈ 0.02; allow 4 sigma.
    assert abs(est - true) < 0.09, (est, true)


def test_near_duplicate_licences_found_distinct_kept():
    rng = random.Random(3)
    docs = [
        "Copyright (c) 2019 Alice Example\n\n" + MIT,
        "Copyright (c) 2023 Bob Sample and contributors\n\n" + MIT,   # near duplicate of 0
        "MIT License. Copyright 2021 Carol\n" + MIT.replace("free of charge", "free of charge,"),  # of 0
        "Copyright (c) 2010, Dave\nAll rights reserved.\n" + BSD,
        random_doc(rng, 200),
        random_doc(rng, 200),
        "Copyright (c) 2011, Erin\nAll rights reserved.\n" + BSD,      # near duplicate of 3
    ]
    drop, counters = near_duplicates([shingle_hashes(d, 5) for d in docs])
    assert drop == [1, 2, 6]
    assert counters["verified_pairs"] == 3


def test_candidates_need_true_jaccard():
    # Two documents sharing half their shingles can be LSH candidates at few rows per band, but
    # verification with the true Jaccard (0.5 < 0.7) must keep both.
    rng = random.Random(4)
    words = random_doc(rng, 200).split()
    d1, d2 = " ".join(words), " ".join(words[:130] + random_doc(rng, 70).split())
    sh = [shingle_hashes(d1, 5), shingle_hashes(d2, 5)]
    assert 0.4 < jaccard(*sh) < 0.7
    drop, counters = near_duplicates(sh, num_hashes=32, bands=32, threshold=0.7)  # 1 row per band
    assert counters["candidate_pairs"] == 1 and drop == []


def test_lsh_buckets_and_union_find():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [8, 8, 3, 4], [7, 7, 7, 7]], dtype=np.uint32)
    assert lsh_candidates(sigs, bands=2) == {(0, 1), (0, 2)}
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(4, 1)
    assert [uf.find(i) for i in range(5)] == [0, 1, 2, 1, 1]
