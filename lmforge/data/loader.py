"""Batches of token windows from memory-mapped shards, for training and evaluation.

Two batch builders, both deterministic given a seed, resumable from `state_dict()` and split across
data-parallel ranks (rank r of W reads only its own part):

- `RandomWindowSampler`: each row is `seq_len + 1` consecutive tokens starting anywhere in the
  shards (nanoGPT style). Batch k of rank r comes from a generator seeded by (seed, rank, k), so the
  state is just k and resuming needs no replay.
- `DocumentPacker`: walks the token stream in order (rank r owns the r-th of W equal contiguous
  slices), or with `shuffle` its documents in a new random order each epoch (rank r takes every W-th),
  and packs it into rows that always start with the document token (BOS). A document that
  does not fit in the rest of a row is cut; its remainder starts the next row after a fresh BOS, so
  no token is dropped. Each batch carries `doc_ids` (segment index per position, a new segment at
  every BOS) and `positions` (restarting at 0 in every segment), so attention can be kept inside a
  document and position embeddings restart per document.

A batch is a dict of CPU tensors: input_ids [B,T] long, targets [B,T] long (-100 = ignored),
optionally doc_ids and positions [B,T] long. `to_device` moves one to the GPU from pinned memory
without blocking; `Prefetcher` builds the next batch on a background thread while the current step
is launched.

This module knows nothing about models or tokenizers beyond the BOS id in the shard header.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import list_shards, open_shard
from lmforge.errors import DataError

Batch = dict[str, torch.Tensor]


class TokenStream:
    """Shards of one split, as one read-only concatenated token array (without copying)."""

    def __init__(self, paths: str | os.PathLike | list, bos_id: int | None = None):
        if isinstance(paths, str | os.PathLike) and Path(paths).is_dir():
            paths = list_shards(paths)
        elif isinstance(paths, str | os.PathLike):
            paths = [paths]
        if not paths:
            raise DataError("no token shards given")
        self.paths = [Path(p) for p in paths]
        self.arrays, headers = zip(*(open_shard(p) for p in self.paths))
        self.headers = list(headers)
        hashes = {h.get("tokenizer_hash") for h in self.headers}
        if len(hashes) > 1:
            raise DataError(f"shards were written by different tokenizers ({sorted(map(str, hashes))}): "
                            f"{[str(p) for p in self.paths]}")
        self.tokenizer_hash = next(iter(hashes))
        self.vocab_size = max(int(h.get("vocab_size") or 0) for h in self.headers) or None
        self.bos_id = bos_id if bos_id is not None else self.headers[0].get("bos_id")
        self.lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.total = int(self.starts[-1])
        self._window_views: dict[tuple[int, int], np.ndarray] = {}

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the concatenation (may span shards), as int64."""
        if start < 0 or start + n > self.total:
            raise DataError(f"read [{start}, {start + n}) past the end of {self.total} tokens")
        out = np.empty(n, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = start - int(self.starts[i])
        while filled < n:
            take = min(n - filled, int(self.lengths[i]) - pos)
            out[filled:filled + take] = self.arrays[i][pos:pos + take]
            filled += take
            i += 1
            pos = 0
        return out

    def _windows(self, i: int, n: int) -> np.ndarray:
        """Shard i as a read-only [len - n + 1, n] view of its windows (no copy), built once per n."""
        key = (i, n)
        if key not in self._window_views:
            self._window_views[key] = np.lib.stride_tricks.sliding_window_view(self.arrays[i], n)
        return self._window_views[key]

    def read_windows(self, starts: np.ndarray, n: int) -> np.ndarray:
        """Rows [s, s + n) for every s in `starts`, as an int64 array [len(starts), n].

        The same rows as `read` per start, but one vectorised gather per shard: a window that lies
        inside one shard is a row of that shard's sliding-window view; only the few windows that
        span a shard boundary go through `read`.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + n > self.total):
            bad = int(starts.min() if starts.min() < 0 else starts.max())
            raise DataError(f"read [{bad}, {bad + n}) past the end of {self.total} tokens")
        out = np.empty((len(starts), n), dtype=np.int64)
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[shard]
        inside = local + n <= self.lengths[shard]
        for i in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == i))
            out[rows] = self._windows(int(i), n)[local[rows]]
        for r in np.flatnonzero(~inside):
            out[r] = self.read(int(starts[r]), n)
        return out


def segments(input_ids: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (a new segment at each BOS; 0 before the first) and positions restarting per segment."""
    is_bos = input_ids == bos_id
    doc_ids = torch.cumsum(is_bos.long(), dim=-1)
    idx = torch.arange(input_ids.size(-1)).expand_as(input_ids)
    # index of the latest segment start at or before each position
    start = torch.where(is_bos, idx, torch.zeros_like(idx))
    start = torch.cummax(start, dim=-1).values
    return doc_ids, idx - start


def _check_split(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"data-parallel rank {rank} is not in [0, {world_size})")


class RandomWindowSampler:
    """Random windows of seq_len + 1 tokens; with `document_mask`, also doc_ids/positions by BOS."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, document_mask: bool = False):
        _check_split(rank, world_size)
        if stream.total < seq_len + 1:
            raise DataError(f"shards hold {stream.total} tokens, fewer than one window of {seq_len + 1}")
        if document_mask and stream.bos_id is None:
            raise DataError("document_mask needs a BOS id (shard header 'bos_id' is missing)")
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.document_mask = document_mask
        self.step = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, self.world_size, self.step])
        starts = rng.integers(0, self.stream.total - self.seq_len, size=self.batch_size)
        rows = self.stream.read_windows(starts, self.seq_len + 1)
        self.step += 1
        rows_t = torch.from_numpy(rows)
        batch = {"input_ids": rows_t[:, :-1].contiguous(), "targets": rows_t[:, 1:].contiguous()}
        if self.document_mask:
            batch["doc_ids"], batch["positions"] = segments(batch["input_ids"], self.stream.bos_id)
        return batch

    def state_dict(self) -> dict:
        return {"kind": "random", "step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, {"kind": "random", "seed": self.seed, "rank": self.rank,
                             "world_size": self.world_size})
        self.step = int(state["step"])


class DocumentPacker:
    """BOS-aligned packing of this rank's part of the stream; wraps around at its end.

    In order (default): rank r walks the r-th contiguous slice. With `shuffle`, documents (found by
    their BOS token) are visited in a new random order each epoch (seeded by (seed, epoch)), and rank
    r takes every W-th document of that order; use it for corpora stored in a meaningful order.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, loop: bool = True, shuffle: bool = False, seed: int = 0):
        _check_split(rank, world_size)
        if stream.bos_id is None:
            raise DataError("the document packer needs a BOS id (shard header 'bos_id' is missing)")
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.shuffle, self.seed = shuffle, seed
        self.begin = stream.total * rank // world_size
        self.end = stream.total * (rank + 1) // world_size
        if shuffle:
            starts = [np.flatnonzero(np.asarray(a) == stream.bos_id) + int(o)
                      for a, o in zip(stream.arrays, stream.starts[:-1])]
            starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
            if len(starts) == 0 or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            self.doc_starts = starts.astype(np.int64)
            self.doc_ends = np.concatenate([starts[1:], [stream.total]]).astype(np.int64)
        self.epoch, self.segment, self.offset = 0, 0, 0
        self._segments = self._epoch_segments()
        mine = int((self._segments[1] - self._segments[0]).sum())
        if mine < seq_len + 1:
            raise DataError(f"rank {rank}'s part of the stream holds {mine} tokens, fewer than one row "
                            f"of {seq_len + 1}")

    def _epoch_segments(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the token ranges this rank walks in this epoch, in order."""
        if not self.shuffle:
            return np.array([self.begin]), np.array([self.end])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.doc_starts))
        mine = order[self.rank::self.world_size]
        return self.doc_starts[mine], self.doc_ends[mine]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _row(self) -> np.ndarray:
        bos = self.stream.bos_id
        n = self.seq_len + 1
        starts, ends = self._segments
        if self.segment >= len(starts):
            if not self.loop:
                raise StopIteration
            self.epoch, self.segment, self.offset = self.epoch + 1, 0, 0
            self._segments = starts, ends = self._epoch_segments()
        first = int(self.stream.read(int(starts[self.segment]) + self.offset, 1)[0])
        parts = [np.array([] if first == bos else [bos], dtype=np.int64)]  # a cut document continues
        space = n - len(parts[0])                                            # after a fresh BOS
        while space > 0 and self.segment < len(starts):
            pos = int(starts[self.segment]) + self.offset
            take = min(space, int(ends[self.segment]) - pos)
            parts.append(self.stream.read(pos, take))
            space -= take
            self.offset += take
            if pos + take == int(ends[self.segment]):
                self.segment, self.offset = self.segment + 1, 0
        row = np.concatenate(parts)
        if len(row) < n:  # end of this rank's part: pad targets with -100 (ignored)
            row = np.concatenate([row, np.full(n - len(row), -100, dtype=np.int64)])
        return row

    def __next__(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            try:
                rows.append(self._row())
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        rows_t = torch.from_numpy(np.stack(rows))
        input_ids = rows_t[:, :-1].contiguous()
        targets = rows_t[:, 1:].contiguous()
        pad = input_ids == -100
        input_ids[pad] = self.stream.bos_id  # padded inputs have ignored targets; any valid id works
        doc_ids, positions = segments(input_ids, self.stream.bos_id)
        return {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids, "positions": positions}

    def state_dict(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "segment": self.segment, "offset": self.offset,
                "rank": self.rank, "world_size": self.world_size, "total": self.stream.total,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, {"kind": "packed", "rank": self.rank, "world_size": self.world_size,
                             "total": self.stream.total, "shuffle": self.shuffle, "seed": self.seed})
        self.epoch, self.segment, self.offset = int(state["epoch"]), int(state["segment"]), int(state["offset"])
        self._segments = self._epoch_segments()


def _check_state(state: dict, expected: dict) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise DataError(f"data loader state does not match this loader: {key} = {state.get(key)!r}, "
                            f"expected {value!r}")


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move a batch to `device`; on CUDA from pinned memory with non-blocking copies."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class Prefetcher:
    """Wraps a batch builder: a background thread builds the next batch (the numpy read and the copy
    into pinned memory) while the training thread launches the current step's kernels, so the step
    never waits for the host read. Batches come in the builder's order, one read ahead at most.

    `state_dict()` describes the batches handed out, not the one being prefetched; `load_state_dict`
    waits for the read in flight, then discards it.
    """

    def __init__(self, batches, device: torch.device | str):
        self.batches, self.device = batches, torch.device(device)
        self._state = batches.state_dict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-prefetch")
        self._pending: Future | None = None

    def __iter__(self):
        return self

    def _read(self) -> tuple[Batch, dict] | None:
        """Runs on the worker thread: the next host batch (pinned for CUDA) and the state after it."""
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, self.batches.state_dict()

    def __next__(self) -> Batch:
        fetched = (self._pending or self._pool.submit(self._read)).result()
        self._pending = None
        if fetched is None:
            raise StopIteration
        batch, state = fetched
        # Start the next read before this batch's copy and kernels are issued: the worker reads
        # while the caller enqueues the step.
        self._pending = self._pool.submit(self._read)
        self._state = state
        if self.device.type == "cuda":  # already pinned: the copy returns at once
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self.batches.load_state_dict(state)
        self._state = state

    def _drain(self) -> None:
        """Wait for the read in flight (it moves the builder) and drop its batch."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with contextlib.suppress(Exception):
                pending.result()

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
