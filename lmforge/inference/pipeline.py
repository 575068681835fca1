"""Device-side state of the engine's steady-state decode step, and the step in flight.

In steady state (the same rows decode step after step, all with settings `sampling.fast_key`
accepts) the engine never builds a tensor from Python lists: each row's last token and its
position live in two device buffers [max_batch, 1] that the step itself advances (the sampled
tokens are written into `tokens`, `positions` is incremented in place). The only host traffic of
a step is one copy of its tokens into pinned host memory (non_blocking) with a CUDA event. The
engine launches step t+1 before it waits on that event for step t, so its stop checks and
streaming of step t overlap the GPU running t+1 (a row that stops at t gets one extra token from
t+1, which is thrown away: the row's cache slot beyond its length is never read).

This module holds buffers and copies; the scheduling decisions (when to load, launch, drain)
are the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list  # engine Sequences decoded by it (token of seq s: row s.slot)
    key: tuple  # its sampling.fast_key
    host: torch.Tensor  # [rows] tokens, on the host once `event` has completed
    event: torch.cuda.Event | None  # None on CPU: `host` is ready at once

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # the step's only wait, while the next step already runs
        return self.host.tolist()


class DecodeBuffers:
    """tokens / positions [max_batch, 1] on the device: row b's last sampled token and the
    position it goes to. Rows without a sequence hold junk, as the fixed-shape step writes junk
    into free rows anyway (positions stay below max_len, so writes stay inside the cache)."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device):
        self.max_len = max_len
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.cuda = device.type == "cuda"
        self.device = device
        # two pinned host buffers: step t's copy must survive until the host has read it, while
        # step t+1 copies into the other one
        self.host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
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

    def advance(self, next_tokens: torch.Tensor, seqs, key: tuple) -> InFlight:
        """Rows 0..len(next_tokens) sampled next_tokens: they become the rows' last tokens, one
        position later; start their copy to the host."""
        nb = next_tokens.shape[0]
        self.tokens[:nb, 0].copy_(next_tokens)
        self.positions[:nb].add_(1).clamp_(max=self.max_len - 1)
        if not self.cuda:
            return InFlight(list(seqs), key, next_tokens, None)
        host, event = self.host[self.flip], self.events[self.flip]
        self.flip ^= 1
        host[:nb].copy_(next_tokens, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))  # the engine's device, not the current one
        return InFlight(list(seqs), key, host[:nb], event)


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
