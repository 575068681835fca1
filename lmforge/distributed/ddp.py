"""Data parallelism written out: gradients summed (or averaged) over ranks after each backward.

Two implementations with one interface (`no_sync()`, `finish()`, `broadcast_parameters()`):

- `NaiveDDP`, the readable baseline: after backward, one blocking all-reduce per parameter.
- `BucketedDDP`, the fast one (the algorithm of torch DDP's Reducer):
  1. Parameters are packed, in reverse registration order (roughly the order backward produces their
     gradients), into flat buckets of at most `bucket_mb` MB.
  2. A post-accumulate-grad hook on each parameter copies its gradient into its bucket slot. When a
     bucket's last gradient arrives, its all-reduce is launched asynchronously, so communication
     overlaps the rest of the backward pass. Buckets are launched strictly in index order (a ready
     bucket waits for its predecessors) so every rank issues the collectives in the same order.
  3. A callback queued on the autograd engine runs when backward ends: it launches buckets still
     waiting (those holding parameters this rank did not use), waits for all of them and points
     each `p.grad` at its reduced slot. `loss.backward()` returns with synchronized gradients.

Details both handle:
- Tied parameters (one tensor reachable under two names) are reduced once.
- Unused parameters: each bucket carries one extra element per parameter, 1 where this rank produced
  a gradient. After the reduction a parameter that no rank used keeps `grad = None` (the optimizer
  skips it, as in single-process training); one used on some ranks gets the sum of their gradients.
- Gradient accumulation: inside `no_sync()` the hooks do nothing and gradients accumulate locally;
  the first backward outside it reduces the accumulated gradients.
- `op="sum"` (what lmforge's Trainer uses: it divides by the global token count itself) or
  `op="mean"` (torch DDP's convention: divide by the world size).
- With `owners` (ZeRO-2) a bucket holds one owner's parameters and is `reduce`d to that rank
  only; the other ranks drop those gradients after the step's communication finishes.

The model is not wrapped: parameter names, `forward` and checkpoints stay exactly the model's own.
This module does not shard parameters (see zero.py, fsdp.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in registration order, each tied tensor once."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():  # nn.Module.parameters() already skips duplicates; be explicit anyway
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0, group=None) -> None:
    """Make every rank start from the parameters and buffers of the group's rank `src` (one flat
    buffer per dtype). `src` is a rank within `group`, so a subgroup without global rank 0 works."""
    if dist.get_world_size(group) == 1:
        return
    global_src = dist.get_global_rank(group, src) if group is not None else src
    tensors = list({id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group_tensors])
        dist.broadcast(flat, src=global_src, group=group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class _Base:
    def __init__(self, model: nn.Module, op: str, group, broadcast: bool):
        if op not in ("sum", "mean"):
            raise ConfigError(f"data-parallel op = {op!r} must be 'sum' or 'mean'")
        if not dist.is_initialized():
            raise ConfigError("data parallelism needs an initialised process group "
                              "(lmforge.distributed.init_distributed, under torchrun)")
        self.model, self.op, self.group = model, op, group
        self.world_size = dist.get_world_size(group)
        self.params = unique_parameters(model)
        self._sync = True
        if broadcast:
            broadcast_parameters(model, group=group)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communication."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def broadcast_parameters(self) -> None:
        broadcast_parameters(self.model, group=self.group)


class NaiveDDP(_Base):
    """Blocking per-parameter all-reduce after backward; call `finish()` before the optimizer step."""

    def __init__(self, model: nn.Module, op: str = "mean", group=None, broadcast: bool = True):
        super().__init__(model, op, group, broadcast)

    @torch.no_grad()
    def finish(self) -> None:
        if not self._sync:
            return
        # Which parameters did any rank use? (one small all-reduce; keeps grad=None for unused ones)
        used = torch.tensor([float(p.grad is not None) for p in self.params],
                            device=self.params[0].device)
        dist.all_reduce(used, group=self.group)
        for p, n_used in zip(self.params, used.tolist()):
            if n_used == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.op == "mean":
                p.grad.div_(self.world_size)
            dist.all_reduce(p.grad, group=self.group)


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # gradient elements; the buffer has len(params) more for the "used" flags
    dtype: torch.dtype
    device: torch.device
    owner: int | None = None  # ZeRO-2: the only rank that keeps the reduced gradient
    buffer: torch.Tensor | None = None
    ready: set[int] = field(default_factory=set)
    work: object | None = None


class BucketedDDP(_Base):
    """Bucketed all-reduce launched from gradient hooks during backward (see the module docstring)."""

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0, op: str = "mean", group=None,
                 broadcast: bool = True, owners: dict[int, int] | None = None):
        super().__init__(model, op, group, broadcast)
        if bucket_mb <= 0:
            raise ConfigError(f"bucket_mb = {bucket_mb} must be > 0")
        self.rank = dist.get_rank(group)
        self.owners = owners  # id(param) -> owning rank (ZeRO-2), or None: every rank keeps all grads
        self.buckets = self._build_buckets(int(bucket_mb * 2**20))
        self._where = {id(p): (b, i) for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket.params)}
        self._next = 0  # index of the next bucket to launch
        self._callback_queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _build_buckets(self, cap_bytes: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        open_: dict[tuple, _Bucket] = {}
        for p in reversed(self.params):
            owner = self.owners[id(p)] if self.owners is not None else None
            key = (p.dtype, p.device, owner)
            b = open_.get(key)
            size = p.numel() * p.element_size()
            if b is not None and (b.numel * p.element_size() + size > cap_bytes):
                b = None
            if b is None:
                b = _Bucket([], [], 0, p.dtype, p.device, owner)
                open_[key] = b
                buckets.append(b)
            b.params.append(p)
            b.offsets.append(b.numel)
            b.numel += p.numel()
        return buckets

    def bucket_names(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order (for inspection and tests)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [[names[id(p)] for p in b.params] for b in self.buckets]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- during backward --
    def _hook(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        b_idx, i = self._where[id(p)]
        bucket = self.buckets[b_idx]
        self._slot_in(bucket, i, p.grad)
        p.grad = None  # the bucket holds it now: frees the memory during the rest of backward
        bucket.ready.add(i)
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()

    @torch.no_grad()
    def _slot_in(self, bucket: _Bucket, i: int, grad: torch.Tensor | None) -> None:
        if bucket.buffer is None:
            # every slot is written before the bucket launches; only the flags need a start value
            bucket.buffer = torch.empty(bucket.numel + len(bucket.params), dtype=bucket.dtype,
                                        device=bucket.device)
            bucket.buffer[bucket.numel:].zero_()
        p, start = bucket.params[i], bucket.offsets[i]
        slot = bucket.buffer[start:start + p.numel()]
        if grad is None:
            slot.zero_()
            bucket.buffer[bucket.numel + i] = 0
        else:
            if self.op == "mean":
                torch.div(grad.reshape(-1), self.world_size, out=slot)  # pre-divide, as torch DDP does
            else:
                slot.copy_(grad.reshape(-1))
            bucket.buffer[bucket.numel + i] = 1

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                return
            if bucket.owner is None:
                bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            else:
                dst = dist.get_global_rank(self.group, bucket.owner) if self.group is not None else bucket.owner
                bucket.work = dist.reduce(bucket.buffer, dst=dst, group=self.group, async_op=True)
            self._next += 1

    @torch.no_grad()
    def _finish_backward(self) -> None:
        self._callback_queued = False
        for bucket in self.buckets:  # parameters this rank did not reach in this backward
            for i, p in enumerate(bucket.params):
                if i not in bucket.ready:
                    self._slot_in(bucket, i, p.grad)
                    bucket.ready.add(i)
        self._launch_ready()
        for bucket in self.buckets:
            bucket.work.wait()
        kept = [b for b in self.buckets if b.owner is None or b.owner == self.rank]
        # one device-to-host copy for all "used by some rank" flags (a single sync per step)
        flags = torch.cat([b.buffer[b.numel:] for b in kept]).tolist() if kept else []
        pos = 0
        for bucket in self.buckets:
            keep = bucket.owner is None or bucket.owner == self.rank
            for i, p in enumerate(bucket.params):
                if not keep:
                    p.grad = None
                    continue
                used, pos = flags[pos], pos + 1
                if used == 0:
                    p.grad = None
                    continue
                start = bucket.offsets[i]
                # the reduced slot becomes the gradient (a view: no copy); a fresh buffer is made
                # next step so these views stay valid until zero_grad drops them.
                p.grad = bucket.buffer[start:start + p.numel()].view_as(p)
            bucket.buffer, bucket.work = None, None
            bucket.ready.clear()
        self._next = 0

    def finish(self) -> None:
        """Nothing to do: gradients are synchronized when backward returns (kept for the interface)."""


def apply_ddp(model: nn.Module, *, bucket_mb: float = 25.0, naive: bool = False, op: str = "mean",
              group=None, broadcast: bool = True) -> BucketedDDP | NaiveDDP:
    """Make `model` data-parallel over `group` (default: the world). Returns the handle that owns
    the hooks; the model object itself is unchanged (same names, same forward)."""
    if naive:
        return NaiveDDP(model, op=op, group=group, broadcast=broadcast)
    return BucketedDDP(model, bucket_mb=bucket_mb, op=op, group=group, broadcast=broadcast)
