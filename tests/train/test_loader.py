"""Random-window sampler and BOS-aligned packer: exact contents, determinism, resume, rank split."""

import threading

import numpy as np
import pytest
import torch

from lmforge.data.loader import DocumentPacker, Prefetcher, RandomWindowSampler, TokenStream, segments
from lmforge.errors import DataError

from .conftest import BOS, random_docs, write_docs


def test_stream_reads_across_shards(shard_dir):
    s = TokenStream(shard_dir)
    whole = np.concatenate([np.asarray(a, dtype=np.int64) for a in s.arrays])
    assert s.total == len(whole) and s.bos_id == BOS
    a = len(s.arrays[0])
    np.testing.assert_array_equal(s.read(a - 5, 11), whole[a - 5:a + 6])


def test_segments_by_hand():
    ids = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 1, 2, 3, 4, 5]])
    doc, pos = segments(ids, bos_id=0)
    assert doc.tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]]


def test_random_windows_are_slices_and_resumable(shard_dir):
    s = TokenStream(shard_dir)
    whole = np.concatenate([np.asarray(a, dtype=np.int64) for a in s.arrays])
    a = RandomWindowSampler(s, batch_size=5, seq_len=13, seed=7)
    batches = [next(a) for _ in range(4)]
    for b in batches:
        for x, y in zip(b["input_ids"].numpy(), b["targets"].numpy()):
            np.testing.assert_array_equal(x[1:], y[:-1])
            starts = [i for i in range(len(whole) - 13) if (whole[i:i + 13] == x).all()]
            assert starts, "window is not a slice of the stream"
    b2 = RandomWindowSampler(s, batch_size=5, seq_len=13, seed=7)
    b2.load_state_dict(a.__class__(s, 5, 13, seed=7).state_dict() | {"step": 2})
    assert torch.equal(next(b2)["input_ids"], batches[2]["input_ids"])
    other_rank = RandomWindowSampler(s, batch_size=5, seq_len=13, seed=7, rank=1, world_size=2)
    assert not torch.equal(next(other_rank)["input_ids"], batches[0]["input_ids"])
    with pytest.raises(DataError, match="rank"):
        RandomWindowSampler(s, 5, 13, rank=2, world_size=2)


def test_packer_rows_start_with_bos_and_drop_nothing(tmp_path):
    docs = random_docs(30, seed=3, lo=2, hi=30)
    write_docs(tmp_path / "s", docs)
    stream = TokenStream(tmp_path / "s")
    p = DocumentPacker(stream, batch_size=3, seq_len=17, loop=False)
    recovered, rows = [], []
    for batch in p:
        x, y = batch["input_ids"], batch["targets"]
        assert (x[:, 0] == BOS).all()
        valid = y != -100
        for xi, yi, vi, di, pi in zip(x, y, valid, batch["doc_ids"], batch["positions"]):
            row = torch.cat([xi[:1], yi[vi]])
            rows.append(row)
            ref_doc, ref_pos = segments(xi.unsqueeze(0), BOS)
            assert torch.equal(di, ref_doc[0]) and torch.equal(pi, ref_pos[0])
    # Rows are the stream in order, each continuation prefixed by an inserted BOS.
    stream_tokens = stream.read(0, stream.total).tolist()
    pos = 0
    for row in rows:
        r = row.tolist()
        if stream_tokens[pos] != BOS:
            assert r[0] == BOS
            r = r[1:]
        assert r == stream_tokens[pos:pos + len(r)]
        pos += len(r)
        recovered += r
    assert recovered == stream_tokens


def test_packer_resume_and_ranks(shard_dir):
    stream = TokenStream(shard_dir)
    p = DocumentPacker(stream, batch_size=4, seq_len=11)
    first = [next(p) for _ in range(3)]
    state = p.state_dict()
    after = [next(p) for _ in range(60)]  # wraps around at least once
    assert p.epoch >= 1
    q = DocumentPacker(stream, batch_size=4, seq_len=11)
    q.load_state_dict(state)
    for b in after:
        nb = next(q)
        assert all(torch.equal(b[k], nb[k]) for k in b)
    r0 = DocumentPacker(stream, 4, 11, rank=0, world_size=2)
    r1 = DocumentPacker(stream, 4, 11, rank=1, world_size=2)
    assert r0.end == r1.begin and r1.end == stream.total
    assert not torch.equal(next(r0)["input_ids"], next(r1)["input_ids"])
    assert torch.equal(next(DocumentPacker(stream, 4, 11))["input_ids"], first[0]["input_ids"])
    with pytest.raises(DataError, match="does not match"):
        r1.load_state_dict(state)


def test_prefetcher_state_counts_consumed_batches(shard_dir):
    stream = TokenStream(shard_dir)
    p = Prefetcher(DocumentPacker(stream, 2, 9), "cpu")
    b0 = next(p)
    state = p.state_dict()
    b1 = next(p)
    q = DocumentPacker(stream, 2, 9)
    q.load_state_dict(state)
    assert torch.equal(next(q)["input_ids"], b1["input_ids"])
    assert not torch.equal(b0["input_ids"], b1["input_ids"])


def test_shuffled_packer_covers_every_token_once(tmp_path):
    """Over one epoch the ranks together emit every non-BOS token of the stream exactly once (as a
    multiset; BOS tokens are also inserted before continuations), in an order unlike the stream's."""
    docs = random_docs(25, seed=5, lo=2, hi=12)
    write_docs(tmp_path / "s", docs)
    stream = TokenStream(tmp_path / "s")
    emitted = []
    firsts = []
    for rank in range(2):
        p = DocumentPacker(stream, batch_size=2, seq_len=17, rank=rank, world_size=2, loop=False,
                           shuffle=True, seed=3)
        for batch in p:
            for x, y in zip(batch["input_ids"], batch["targets"]):
                row = torch.cat([x[:1], y[y != -100]]).tolist()
                firsts.append(row)
                emitted += [t for t in row if t != BOS]
    assert sorted(emitted) == sorted(t for d in docs for t in d)
    in_order = [t for d in docs for t in [BOS, *d]][:18]
    assert firsts[0] != in_order


def test_shuffled_packer_resumes_across_epochs(shard_dir):
    stream = TokenStream(shard_dir)
    p = DocumentPacker(stream, 3, 13, shuffle=True, seed=1)
    [next(p) for _ in range(5)]
    state = p.state_dict()
    after = [next(p) for _ in range(80)]  # crosses into the next epoch (a new order)
    assert p.epoch >= 1
    q = DocumentPacker(stream, 3, 13, shuffle=True, seed=1)
    q.load_state_dict(state)
    assert all(torch.equal(a["input_ids"], next(q)["input_ids"]) for a in after)
    with pytest.raises(DataError, match="seed"):
        DocumentPacker(stream, 3, 13, shuffle=True, seed=2).load_state_dict(state)


def _loop_windows(stream, starts, n):
    """The per-window read the sampler used before `read_windows` (the reference)."""
    return np.stack([stream.read(int(s), n) for s in starts])


def test_read_windows_match_per_window_reads_across_shards(tmp_path):
    d = tmp_path / "s"
    for k, (n_docs, seed) in enumerate([(9, 4), (2, 5), (14, 6), (1, 7)]):  # a tiny shard in the middle
        write_docs(d / f"train_{k:03d}", random_docs(n_docs, seed=seed, lo=2, hi=19))
    stream = TokenStream(d)
    n = 23
    assert min(stream.lengths) < n  # some windows cross two boundaries
    rng = np.random.default_rng(11)
    edges = stream.starts[1:-1]
    starts = np.concatenate([rng.integers(0, stream.total - n, size=97),
                             edges - 1, edges - n, edges - n + 1, edges, [0, stream.total - n]])
    starts = starts[(starts >= 0) & (starts <= stream.total - n)]
    np.testing.assert_array_equal(stream.read_windows(starts, n), _loop_windows(stream, starts, n))
    assert stream.read_windows(np.zeros(0, dtype=np.int64), n).shape == (0, n)
    with pytest.raises(DataError, match="past the end"):
        stream.read_windows(np.array([stream.total - n + 1]), n)


def test_random_sampler_batches_equal_the_per_window_loop(shard_dir):
    """Bit for bit the batches of the old sampler: same generator, same starts, same rows."""
    s = TokenStream(shard_dir)
    for rank, world in [(0, 1), (1, 3)]:
        sampler = RandomWindowSampler(s, batch_size=19, seq_len=37, seed=5, rank=rank, world_size=world)
        for step in range(6):
            rng = np.random.default_rng([5, rank, world, step])
            rows = _loop_windows(s, rng.integers(0, s.total - 37, size=19), 38)
            b = next(sampler)
            assert torch.equal(b["input_ids"], torch.from_numpy(rows[:, :-1]))
            assert torch.equal(b["targets"], torch.from_numpy(rows[:, 1:]))


class _Recording:
    """A batch builder that records the thread each batch is built on."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __next__(self):
        self.threads.append(threading.current_thread().name)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_prefetcher_reads_ahead_on_a_thread_and_resumes_exactly(shard_dir):
    stream = TokenStream(shard_dir)
    plain = RandomWindowSampler(stream, 4, 11, seed=3)
    ref = [next(plain) for _ in range(7)]
    rec = _Recording(RandomWindowSampler(stream, 4, 11, seed=3))
    p = Prefetcher(rec, "cpu")
    got = [next(p) for _ in range(3)]
    state = p.state_dict()
    assert state["step"] == 3
    assert all(torch.equal(g["input_ids"], r["input_ids"]) for g, r in zip(got, ref))
    p._pending.result()  # the read ahead of batch 3 was started by the third next()
    assert len(rec.threads) == 4 and all(t.startswith("lmforge-prefetch") for t in rec.threads)
    # a read is in flight (batch 3); loading a state drops it and the stream continues from there
    p.load_state_dict(RandomWindowSampler(stream, 4, 11, seed=3).state_dict() | {"step": 5})
    assert torch.equal(next(p)["targets"], ref[5]["targets"])
    p.load_state_dict(state)
    assert torch.equal(next(p)["input_ids"], ref[3]["input_ids"])
    assert p.state_dict()["step"] == 4
    p.close()


def test_prefetcher_stops_and_passes_on_errors(tmp_path):
    write_docs(tmp_path / "s", random_docs(4, seed=8, lo=3, hi=6))
    stream = TokenStream(tmp_path / "s")
    p = Prefetcher(DocumentPacker(stream, batch_size=2, seq_len=5, loop=False), "cpu")
    q = DocumentPacker(stream, batch_size=2, seq_len=5, loop=False)
    for expected in q:
        assert torch.equal(next(p)["input_ids"], expected["input_ids"])
    with pytest.raises(StopIteration):
        next(p)

    class Broken:
        def __next__(self):
            raise DataError("shard train_000 is truncated")

        def state_dict(self):
            return {}

    with pytest.raises(DataError, match="truncated"):
        next(Prefetcher(Broken(), "cpu"))
