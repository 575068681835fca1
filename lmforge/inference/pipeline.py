"""Device-side state of the engine's steady-state decode step, and the step in flight.

In steady state (the same rows decode step after step, all with settings `sampling.fast_key`
accepts) the engine never builds a tensor from Python lists: each row's last token and its
position live in two device buffers [max_batch, 1] that the step itself advances (the sampled
tokens are written into `tokens`, `positions` is incremented in place). The only host traffic of
a step is one copy of its tokens into pinned host memory (non_blocking) with a CUDA event. The
engine launches step t+1 before it waits on that event for step t, so its stop checks and
streaming of step t overlap the GPU running t+1 (a row that stops at t gets one extra token from
t+1, which is thrown away: the row's cache slot beyond its length is never read).

With `steps` = k > 1 one launch decodes k tokens per row back to back (`DecodeBuffers.run`:
each step feeds the next from the device buffers) and the host reads them all at once, as vLLM's
multi-step scheduling does: the host's work per launch (the engine's Python, the graph launch)
is paid once per k tokens. A row that stops at token j of a launch drops the tokens after j (their
cache writes lie beyond the row's length, never read). `StepGraphs` captures the k steps in one
plain CUDA graph per (sampling key, attended length): one replay per k tokens.

This module holds buffers, copies and graphs; the scheduling decisions (when to load, launch,
drain) are the engine's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list  # engine Sequences decoded by it (token i of seq s: host[i, s.slot])
    key: tuple  # its sampling.fast_key
    host: torch.Tensor  # [steps, rows] tokens, on the host once `event` has completed
    event: torch.cuda.Event | None  # None on CPU: `host` is ready at once

    def read(self) -> list[list[int]]:
        if self.event is not None:
            self.event.synchronize()  # the step's only wait, while the next step already runs
        return self.host.tolist()


class DecodeBuffers:
    """tokens / positions [max_batch, 1] on the device: row b's last sampled token and the
    position it goes to; out [steps, max_batch]: the tokens of the last launch. Rows without a
    sequence hold junk, as the fixed-shape step writes junk into free rows anyway (positions stay
    below max_len, so writes stay inside the cache)."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device, steps: int = 1):
        self.max_len, self.steps = max_len, steps
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(steps, max_batch, dtype=torch.long, device=device)
        self.cuda = device.type == "cuda"
        self.device = device
        # two pinned host buffers: launch t's copy must survive until the host has read it, while
        # launch t+1 copies into the other one
        self.host = [torch.zeros(steps, max_batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else [None, None]
        self.flip = 0

    def load(self, seqs) -> None:
        """Host state -> device (when the set of running rows changed): one copy per buffer."""
        n = self.tokens.shape[0]
        tok, pos = [0] * n, [0] * n
        for s in seqs:
            tok[s.slot], pos[s.slot] = s.last, s.length
        self.tokens.copy_(torch.tensor(tok)[:, None], non_blocking=True)
        self.positions.copy_(torch.tensor(pos)[:, None], non_blocking=True)

    def inputs(self, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's inputs for rows 0..nb: the buffers themselves when nb covers them all (a
        compiled step guards on them; views would be other tensors and compile it again)."""
        if nb == self.tokens.shape[0]:
            return self.tokens, self.positions
        return self.tokens[:nb], self.positions[:nb]

    def run(self, step, nb: int, key: tuple, length: int) -> None:
        """`steps` decode steps of rows 0..nb, all on the device: step(tokens, positions, key,
        length) -> next tokens [nb], which become the rows' last tokens one position later and
        go to out[i]. No host sync, so a CUDA graph can capture it."""
        for i in range(self.steps):
            nxt = step(*self.inputs(nb), key, length)
            self.tokens[:nb, 0].copy_(nxt)
            self.positions[:nb].add_(1).clamp_(max=self.max_len - 1)
            self.out[i, :nb].copy_(nxt)

    def send(self, seqs, key: tuple) -> InFlight:
        """Start the copy of the last launch's tokens to the host."""
        if not self.cuda:
            return InFlight(list(seqs), key, self.out.clone(), None)
        host, event = self.host[self.flip], self.events[self.flip]
        self.flip ^= 1
        host.copy_(self.out, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))  # the engine's device, not the current one
        return InFlight(list(seqs), key, host, event)


class StepGraphs:
    """`DecodeBuffers.run` over all rows as plain CUDA graphs, one per (sampling key, attended
    length), captured on first use: a replay launches `steps` whole decode steps. On CPU (tests
    of this path) `launch` just runs them.

    Capture needs one run of the step outside it first (compilation, autotuning, library
    handles); that run writes each row's KV at its next position from the row's real last token,
    the very values the next real step writes there, and its sampled tokens are dropped."""

    def __init__(self, bufs: DecodeBuffers):
        self.bufs = bufs
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}  # None: capture failed
        self.pool = None  # one memory pool for all graphs (never replayed at the same time)

    def launch(self, step, key: tuple, length: int) -> None:
        b = self.bufs
        nb = b.tokens.shape[0]
        if not b.cuda:
            b.run(step, nb, key, length)
            return
        if (key, length) not in self.graphs:
            try:
                self.graphs[(key, length)] = self._capture(step, key, length)
            except Exception as e:  # e.g. an op that cannot be captured: run the steps uncaptured
                log.warning("CUDA graph capture of the decode step failed, it runs uncaptured: %s: %s",
                            type(e).__name__, str(e)[:500])
                self.graphs[(key, length)] = None
        graph = self.graphs[(key, length)]
        if graph is None:
            b.run(step, nb, key, length)
        else:
            graph.replay()

    def _capture(self, step, key: tuple, length: int) -> torch.cuda.CUDAGraph:
        b = self.bufs
        nb = b.tokens.shape[0]
        stream = torch.cuda.current_stream(b.device)
        side = torch.cuda.Stream(b.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            step(*b.inputs(nb), key, length)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            b.run(step, nb, key, length)
        self.pool = graph.pool()
        return graph


class HostSyncCounter:
    """Counts the tensor operations that wait for the device (or, on CUDA, copy to it one element
    at a time): `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, bool/int/float of a tensor,
    `t[i] = v`, `torch.tensor(...)`. On CPU nothing waits, but the same calls would on CUDA, so
    counting them on CPU checks the code path (tests and benchmarks/inference_decode.py --overhead).

        with HostSyncCounter() as syncs:
            engine.step()
        syncs.counts  # {"tolist": 1}
    """

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__setitem__")

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner, name: str) -> None:
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return orig(*args, **kwargs)

        self._saved.append((owner, name, owner.__dict__.get(name)))  # None: inherited
        setattr(owner, name, counted)

    def __enter__(self) -> HostSyncCounter:
        for name in self.METHODS:
            self._wrap(torch.Tensor, name)
        self._wrap(torch, "tensor")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())
