"""Data parallelism written out: gradients summed (or averaged) over ranks after each backward.

Two implementations with one interface (`no_sync()`, `finish()`, `broadcast_parameters()`):

- `NaiveDDP`, the readable baseline: after backward, one blocking all-reduce per parameter.
- `BucketedDDP`, the fast one (the algorithm of torch DDP's Reducer, gradient_as_bucket_view=True):
  1. Parameters are packed, in reverse registration order (roughly the order backward produces their
     gradients), into flat buckets: the first of at most `first_bucket_mb` (1 MB, so communication
     starts early), the others of at most `bucket_mb`. Each bucket is one tensor allocated once;
     each slot starts on a 16-byte boundary so vectorized kernels apply to every gradient.
  2. Every parameter's `.grad` is a view of its slot in its bucket, kept across steps: autograd
     accumulates straight into the bucket, and the all-reduce runs in place on it. When `.grad`
     was None (the optimizer's `zero_grad(set_to_none=True)`) the hook copies autograd's fresh
     gradient into the slot once and makes the slot the gradient; `BucketedDDP.zero_grad()` zeroes
     the buckets instead, so no copy happens at all.
  3. A post-accumulate-grad hook marks its parameter ready; when a bucket's last parameter is ready
     its all-reduce is launched asynchronously, so communication overlaps the rest of backward.
     Buckets launch strictly in index order (a ready bucket waits for its predecessors), so every
     rank issues the same collectives in the same order.
  4. A callback queued on the autograd engine runs when backward ends: it launches buckets still
     waiting (those holding parameters this rank did not use) and makes the compute stream wait for
     all of them. `loss.backward()` returns with synchronized gradients; the CPU never waits for the
     GPU (no host sync in the steady state, so it keeps queueing kernels ahead of the GPU).
  5. After the first synchronized backward, rank 0's observed gradient-ready order is broadcast and
     the buckets are rebuilt in that order if it differs (torch DDP does the same), so a model whose
     registration order is not its backward order still launches buckets as early as possible.

Details both handle:
- Tied parameters (one tensor reachable under two names) are reduced once.
- Unused parameters: each bucket carries one extra element per parameter, 1 where this rank produced
  a gradient. A parameter no rank used keeps `grad = None` (the optimizer skips it, as in
  single-process training); one used on some ranks gets the sum of their gradients. Only a rank that
  did not use some parameter reads those flags back (one host sync on that step).
- Gradient accumulation: inside `no_sync()` the hooks only make sure gradients accumulate in the
  buckets; the first backward outside it reduces the accumulated gradients.
- `op="sum"` (what lmforge's Trainer uses: it divides by the global token count itself) or
  `op="mean"` (torch DDP's convention: the bucket is divided by the world size before the reduction).
- With `owners` (ZeRO-2) a bucket holds one owner's parameters and is `reduce`d to that rank
  only; the other ranks drop those gradients (and the bucket) after the step's communication.

Under `torch.compile` the hooks still run (gradient accumulation stays outside the compiled graph),
but a whole-model graph hands all gradients over at the end of its backward, so nothing overlaps;
compile each block separately (`block.compile()`) to keep the overlap.
The model is not wrapped: parameter names, `forward` and checkpoints stay exactly the model's own.
This module does not shard parameters (see zero.py, fsdp.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError, LMForgeError


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in registration order, each tied tensor once."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():  # nn.Module.parameters() already skips duplicates; be explicit anyway
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    index: list[int]  # position of each parameter in BucketedDDP.params
    offsets: list[int]  # slot starts, 16-byte aligned so vectorized kernels (copies, foreach) apply
    numel: int  # gradient elements with alignment padding; the buffer has len(params) more for the flags
    dtype: torch.dtype
    device: torch.device
    owner: int | None = None  # ZeRO-2: the only rank that keeps the reduced gradient
    buffer: torch.Tensor | None = None
    views: list[torch.Tensor] = field(default_factory=list)  # parameter-shaped views of the slots
    ready: int = 0  # parameters whose gradient is final in this backward
    work: object | None = None
    nbytes: int = 0  # gradient bytes (what the size cap counts)

    def allocate(self) -> None:
        self.buffer = torch.zeros(self.numel + len(self.params), dtype=self.dtype, device=self.device)
        self.views = [self.buffer[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]

    def release(self) -> None:
        self.buffer, self.views = None, []


def _is_slot(grad: torch.Tensor, view: torch.Tensor) -> bool:
    return grad is view or (grad.data_ptr() == view.data_ptr() and grad.shape == view.shape)


class BucketedDDP(_Base):
    """Bucketed in-place all-reduce launched from gradient hooks during backward (see the module
    docstring). `zero_grad()` zeroes the buckets (gradients stay views of them)."""

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0, op: str = "mean", group=None,
                 broadcast: bool = True, owners: dict[int, int] | None = None,
                 first_bucket_mb: float = 1.0, rebuild_buckets: bool = True):
        super().__init__(model, op, group, broadcast)
        if bucket_mb <= 0 or first_bucket_mb <= 0:
            raise ConfigError(f"bucket_mb = {bucket_mb}, first_bucket_mb = {first_bucket_mb}: both must be > 0")
        self.rank = dist.get_rank(group)
        self.owners = owners  # id(param) -> owning rank (ZeRO-2), or None: every rank keeps all grads
        self._caps = (int(min(first_bucket_mb, bucket_mb) * 2**20), int(bucket_mb * 2**20))
        n = len(self.params)
        self._fired = [False] * n  # gradient final in the current synchronized backward
        self._touched = [False] * n  # gradient produced since the last synchronization
        self._zeroed = False  # zero_grad() started this window: untouched slots hold zeros, mean "unused"
        self._rebuild_pending = rebuild_buckets and self.world_size > 1
        self._order: list[int] = []  # parameter indices in gradient-ready order (first synced backward)
        self._next = 0  # index of the next bucket to launch
        self._callback_queued = False
        self._set_buckets(list(reversed(range(n))))
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    # -- bucket layout --
    def _keeps(self, bucket: _Bucket) -> bool:
        return bucket.owner is None or bucket.owner == self.rank

    @torch.no_grad()
    def _set_buckets(self, order: list[int]) -> None:
        """Pack parameters (indices into self.params, in launch order) into buckets; allocate the
        buckets this rank keeps and make existing gradients views of them."""
        buckets: list[_Bucket] = []
        open_: dict[tuple, _Bucket] = {}
        for k in order:
            p = self.params[k]
            owner = self.owners[id(p)] if self.owners is not None else None
            key = (p.dtype, p.device, owner)
            b = open_.get(key)
            size = p.numel() * p.element_size()
            if b is not None and b.nbytes + size > (self._caps[0] if b is buckets[0] else self._caps[1]):
                b = None
            if b is None:
                b = _Bucket([], [], [], 0, p.dtype, p.device, owner)
                open_[key] = b
                buckets.append(b)
            align = max(1, 16 // p.element_size())
            b.params.append(p)
            b.index.append(k)
            b.offsets.append(b.numel)
            b.numel += -(-p.numel() // align) * align
            b.nbytes += size
        self.buckets = buckets
        self._where = {}
        for bi, b in enumerate(buckets):
            if self._keeps(b):
                b.allocate()
            for i, (p, k) in enumerate(zip(b.params, b.index)):
                self._where[id(p)] = (bi, i, k)
                if b.buffer is not None and p.grad is not None:
                    b.views[i].copy_(p.grad)
                    p.grad = b.views[i]

    def bucket_names(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order (for inspection and tests)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [[names[id(p)] for p in b.params] for b in self.buckets]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero every bucket (one fill per bucket) and point each kept gradient at its slot; drop
        gradients this rank does not keep (ZeRO-2). Parameters that then get no gradient from any
        rank end the step with `grad = None`, as after `zero_grad(set_to_none=True)`."""
        for b in self.buckets:
            if self._keeps(b):
                b.buffer.zero_()
                for p, v in zip(b.params, b.views):
                    p.grad = v
            else:
                b.release()
                for p in b.params:
                    p.grad = None
        self._zeroed = True

    # -- during backward --
    @torch.no_grad()
    def _adopt(self, bucket: _Bucket, i: int, p: torch.Tensor) -> None:
        """Make p.grad the slot view (copying a gradient that lives elsewhere into it)."""
        if bucket.buffer is None:  # a bucket this rank does not keep: lives until this step's reduce
            bucket.allocate()
        view = bucket.views[i]
        if not _is_slot(p.grad, view):
            view.copy_(p.grad)
            p.grad = view

    def _hook(self, p: torch.Tensor) -> None:
        b_idx, i, k = self._where[id(p)]
        bucket = self.buckets[b_idx]
        self._adopt(bucket, i, p)
        self._touched[k] = True
        if not self._sync:
            return
        if self._fired[k]:
            raise LMForgeError(f"data parallel: the gradient of parameter #{k} {tuple(p.shape)} was finished "
                               "twice in one backward (reentrant activation checkpointing? use "
                               "use_reentrant=False)")
        self._fired[k] = True
        if self._rebuild_pending:
            self._order.append(k)
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next += 1

    @torch.no_grad()
    def _launch(self, bucket: _Bucket) -> None:
        if bucket.buffer is None:  # a foreign bucket none of whose parameters got a gradient here
            bucket.allocate()
        # "used here" flags: 1 for all, then 0 for this rank's unused ones (slices: a fill kernel,
        # never `buffer[i] = v`, which on CUDA copies from the host and synchronizes)
        bucket.buffer[bucket.numel:].fill_(1)
        for i, k in enumerate(bucket.index):
            if not self._touched[k]:
                bucket.buffer[bucket.numel + i:bucket.numel + i + 1].fill_(0)
        if self.op == "mean":
            bucket.buffer.div_(self.world_size)
        if bucket.owner is None:
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        else:
            dst = dist.get_global_rank(self.group, bucket.owner) if self.group is not None else bucket.owner
            bucket.work = dist.reduce(bucket.buffer, dst=dst, group=self.group, async_op=True)

    @torch.no_grad()
    def _finish_backward(self) -> None:
        self._callback_queued = False
        for bucket in self.buckets:  # parameters this rank did not reach in this backward
            if bucket.ready == len(bucket.params):
                continue
            for i, (p, k) in enumerate(zip(bucket.params, bucket.index)):
                if not self._fired[k]:
                    self._prepare_unfired(bucket, i, p, k)
            bucket.ready = len(bucket.params)
        self._launch_ready()
        for bucket in self.buckets:
            bucket.work.wait()  # NCCL: the compute stream waits; the host does not
            bucket.work = None
        unused = [(b, i, p) for b in self.buckets if self._keeps(b)
                  for i, (p, k) in enumerate(zip(b.params, b.index)) if not self._touched[k]]
        if unused:  # did another rank use them? (the only host sync, and only on such steps)
            flags = torch.stack([b.buffer[b.numel + i] for b, i, _ in unused]).tolist()
            for (b, i, p), used in zip(unused, flags):
                p.grad = b.views[i] if used != 0 else None
        for bucket in self.buckets:
            if not self._keeps(bucket):
                bucket.release()
                for p in bucket.params:
                    p.grad = None
            bucket.ready = 0
        self._fired = [False] * len(self.params)
        self._touched = [False] * len(self.params)
        self._zeroed = False
        self._next = 0
        if self._rebuild_pending:
            self._rebuild_pending = False
            self._rebuild_in_ready_order()

    @torch.no_grad()
    def _prepare_unfired(self, bucket: _Bucket, i: int, p: torch.Tensor, k: int) -> None:
        """A parameter this backward gave no gradient: does this rank hold one for it (from earlier
        micro-steps, or set by hand)? Either its slot holds that gradient or it is zeroed."""
        if self._rebuild_pending:
            self._order.append(k)
        if bucket.buffer is None:
            bucket.allocate()
        view = bucket.views[i]
        # after zero_grad() an untouched slot is a zero placeholder, not a gradient
        has_grad = p.grad is not None and (self._touched[k] or not (self._zeroed and _is_slot(p.grad, view)))
        if has_grad:
            self._adopt(bucket, i, p)
        else:
            view.zero_()
        self._touched[k] = has_grad

    @torch.no_grad()
    def _rebuild_in_ready_order(self) -> None:
        """Repack the buckets in rank 0's gradient-ready order (broadcast, so all ranks agree)."""
        order = torch.tensor(self._order, dtype=torch.int64, device=_comm_device(self.group))
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(order, src=src, group=self.group)
        order_list = order.tolist()
        self._order = []
        if order_list != [k for b in self.buckets for k in b.index]:
            self._set_buckets(order_list)

    def finish(self) -> None:
        """Nothing to do: gradients are synchronized when backward returns (kept for the interface)."""


def apply_ddp(model: nn.Module, *, bucket_mb: float = 25.0, naive: bool = False, op: str = "mean",
              group=None, broadcast: bool = True) -> BucketedDDP | NaiveDDP:
    """Make `model` data-parallel over `group` (default: the world). Returns the handle that owns
    the hooks; the model object itself is unchanged (same names, same forward)."""
    if naive:
        return NaiveDDP(model, op=op, group=group, broadcast=broadcast)
    return BucketedDDP(model, bucket_mb=bucket_mb, op=op, group=group, broadcast=broadcast)
