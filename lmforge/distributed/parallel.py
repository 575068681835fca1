"""What the Trainer asks of data parallelism, in one object: `DataParallel(model, optimizer, kind=...)`.

The Trainer (lmforge.train.trainer) knows nothing about ranks; when given `parallel=` it calls:
- `no_sync()` around the backward of every micro-step but the last (no communication),
- `reduce_totals(loss_sum, n_tokens)` after the last backward: sums over ranks, so the gradient is
  divided by the GLOBAL token count (the reducers sum gradients: op="sum") and the update equals
  single-process training on the concatenated batch; it also sums MoE expert-load counts so the
  aux-loss-free routing biases stay identical on all ranks,
- `clip_grad_norm(params, max_norm)`: the global norm (one extra all-reduce when gradients are sharded),
- `any_rank(flag)`: a stop decision all ranks agree on (time budget),
- `save_checkpoint(trainer, path)` / `load_checkpoint(trainer, path)` (checkpoint.py), and `is_main`
  for rank-0-only logs, progress bars, samples and checkpoint files.

Kinds: "ddp" (own bucketed DDP), "naive" (per-parameter all-reduce), "zero1", "zero2" (zero.py),
"fsdp" (FSDP2, fsdp.py). For "fsdp" pass a function `model -> optimizer` instead of an optimizer: the
optimizer must be built over the sharded parameters. FSDP reduce-scatters the MEAN of gradients
(gloo has no pre-multiplied sum), so `reduce_totals` multiplies the local shards by the world size.

`RankSlice(batches, rank, world)` turns a builder of GLOBAL batches (the same on every rank) into this
rank's rows. Its state is the global builder's, so a run resumes exactly on any number of ranks
whose per-rank batch times world size is the same global batch.

With world size 1 and no process group everything degrades to single-process behaviour, so a
checkpoint written by N ranks can be resumed by one process.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError, DataError

KINDS = ("ddp", "naive", "zero1", "zero2", "fsdp")


class RankSlice:
    """This rank's rows of each global batch (rows r*B/W .. (r+1)*B/W)."""

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        rows = next(iter(batch.values())).size(0)
        if rows % self.world_size:
            raise DataError(f"a global batch of {rows} rows does not split evenly over {self.world_size} "
                            "ranks: make the batch size divisible by the number of processes")
        per = rows // self.world_size
        return {k: v[self.rank * per:(self.rank + 1) * per] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


class DataParallel:
    def __init__(self, model: nn.Module, optimizer, kind: str = "ddp", *, bucket_mb: float = 25.0,
                 group=None, fsdp_param_dtype: str | None = None, activation_checkpointing: bool = False):
        if kind not in KINDS:
            raise ConfigError(f"data-parallel kind = {kind!r} must be one of {list(KINDS)}")
        self.kind, self.group, self.model = kind, group, model
        active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if active else 1
        self.rank = dist.get_rank(group) if active else 0
        self.reducer = None
        self.optimizer = optimizer
        self.zero = None
        if kind == "fsdp":
            if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
                raise ConfigError("DataParallel(kind='fsdp') takes a function model -> optimizer: the "
                                  "optimizer must be built over the sharded parameters")
            if active:
                from lmforge.distributed.fsdp import apply_fsdp

                apply_fsdp(model, param_dtype=fsdp_param_dtype, activation_checkpointing=activation_checkpointing)
            self.optimizer = optimizer(model)
        elif self.world_size > 1 or (active and kind.startswith("zero")):
            if kind in ("zero1", "zero2"):
                from lmforge.distributed.zero import apply_zero

                self.reducer, self.zero = apply_zero(model, optimizer, stage=int(kind[-1]),
                                                     bucket_mb=bucket_mb, op="sum", group=group)
                self.optimizer = self.zero
            else:
                from lmforge.distributed.ddp import apply_ddp

                self.reducer = apply_ddp(model, bucket_mb=bucket_mb, naive=kind == "naive", op="sum",
                                         group=group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded_optimizer(self) -> bool:
        return self.zero is not None

    @property
    def fsdp(self) -> bool:
        return self.kind == "fsdp" and self.world_size > 1

    def no_sync(self):
        if self.fsdp:
            return _fsdp_no_sync(self.model)
        return self.reducer.no_sync() if self.reducer is not None else contextlib.nullcontext()

    def reduce_totals(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reducer is not None:
            self.reducer.finish()  # the naive reducer communicates here; the bucketed one already did
        if self.world_size == 1:
            return loss_sum, n_tokens
        if self.fsdp:  # FSDP averaged over ranks; the Trainer divides the SUM by the global tokens
            grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, float(self.world_size))
        self._sum_moe_loads()
        both = torch.stack([loss_sum.double(), n_tokens.double()])
        dist.all_reduce(both, group=self.group)
        return both[0].to(loss_sum.dtype), both[1].round().to(n_tokens.dtype)

    @torch.no_grad()
    def _sum_moe_loads(self) -> None:
        """Aux-loss-free MoE routing biases are updated from expert load counts after the step: sum
        the counts over ranks first, so every replica applies the same (global-batch) update."""
        counts = [m.load_counts for m in getattr(self.model, "moe_layers", lambda: [])()
                  if hasattr(m, "load_counts")]
        if not counts:
            return
        flat = torch.cat([c.reshape(-1) for c in counts])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for c in counts:
            c.copy_(flat[offset:offset + c.numel()].view_as(c))
            offset += c.numel()

    def clip_grad_norm(self, params, max_norm: float | None) -> torch.Tensor:
        if self.fsdp:
            return _clip_local_shards(self.model, max_norm, self.group)
        if self.kind == "zero2" and self.world_size > 1:
            from lmforge.distributed.zero import clip_grad_norm_sharded

            return clip_grad_norm_sharded(params, max_norm, group=self.group)
        from lmforge.train.schedule import clip_grad_norm

        return clip_grad_norm(params, max_norm)

    def any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=_comm_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def save_checkpoint(self, trainer, path):
        from lmforge.distributed.checkpoint import save_checkpoint

        return save_checkpoint(trainer, path, self)

    def load_checkpoint(self, trainer, path) -> dict:
        from lmforge.distributed.checkpoint import load_checkpoint

        return load_checkpoint(trainer, path, self)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@torch.no_grad()
def _clip_local_shards(model, max_norm, group) -> torch.Tensor:
    """Global grad norm from each rank's DTensor shards (disjoint), clipping them in place."""
    from lmforge.distributed.zero import clip_grad_norm_sharded

    class _Local:  # clip_grad_norm_sharded reads .grad
        def __init__(self, g):
            self.grad = g

    return clip_grad_norm_sharded([_Local(p.grad.to_local()) for p in model.parameters() if p.grad is not None],
                                  max_norm, group=group)


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
