"""ZeRO: shard the optimizer state (stage 1) and the reduced gradients (stage 2) over data-parallel ranks.

`ZeroOptimizer(optimizer)` wraps any torch optimizer built over all the model's parameters (lmforge's
AdamW or Muon, torch's): each parameter is owned by one rank, chosen by a greedy balance of bytes
(largest first, to the least loaded rank; the same on every rank). `step()` lets the inner optimizer
update only the owned parameters, so only their moments/momentum buffers are ever created (about
1/world of the state per rank), then every rank's updated parameters are all-gathered so all
replicas are identical again. Whole tensors are owned, not flat slices, so optimizers that need a
whole matrix (Muon's Newton–Schulz orthogonalisation) work unchanged.

Stage 2 (`apply_zero(..., stage=2)`): the bucketed DDP groups each owner's gradients into its own
buckets and `reduce`s each bucket to its owner only (the same traffic as a reduce-scatter of the
flat gradient); other ranks drop those gradients, so each rank holds ~1/world of the gradients
after backward. The global gradient norm then needs one all-reduce (`clip_grad_norm_sharded`).

`state_dict()` holds the owned parameters' state under the global parameter indices of the
wrapped optimizer; `load_state_dict()` takes any subset (e.g. the union of all ranks' shards, on a
different world size) and keeps the owned part. This module does not shard parameters (fsdp.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmforge.distributed.ddp import BucketedDDP
from lmforge.errors import ConfigError


def _all_gather_into(output: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    # torch >= 2.12 renames the collective; keep working on older releases (the GPU box has 2.11)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, inp, group=group)


def partition_parameters(params: list[nn.Parameter], world_size: int) -> list[int]:
    """Owner rank of each parameter: greedy by size, largest first (ties by index), deterministic."""
    order = sorted(range(len(params)), key=lambda i: (-params[i].numel(), i))
    load = [0] * world_size
    owner = [0] * len(params)
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += params[i].numel() * params[i].element_size()
    return owner


class ZeroOptimizer:
    """Optimizer-state sharding around `optimizer` (see the module docstring).

    Exposes what a training loop uses: `param_groups` (the inner optimizer's, so LR schedules
    work), `zero_grad`, `step`, `state_dict`, `load_state_dict`, `state`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group=None):
        if not dist.is_initialized():
            raise ConfigError("ZeRO needs an initialised process group (lmforge.distributed.init_distributed)")
        self.inner, self.group = optimizer, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ConfigError("ZeRO: a parameter appears twice in the optimizer's param_groups")
        owner = partition_parameters(self.params, self.world_size)
        self.owner_of = {id(p): r for p, r in zip(self.params, owner)}
        self.index_of = {id(p): i for i, p in enumerate(self.params)}
        # per dtype: the parameters of each rank, in order, for the all-gather after the step
        self._layout: dict[tuple, list[list[nn.Parameter]]] = {}
        for p in self.params:
            ranks = self._layout.setdefault((p.dtype, p.device), [[] for _ in range(self.world_size)])
            ranks[self.owner_of[id(p)]].append(p)

    # -- the optimizer interface --
    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner_of[id(p)] == self.rank

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("ZeroOptimizer.step does not take a closure")
        hidden = {}
        for p in self.params:  # the inner optimizer skips parameters without a gradient
            if not self.owns(p) and p.grad is not None:
                hidden[p] = p.grad
                p.grad = None
        self.inner.step()
        for p, g in hidden.items():
            p.grad = g
        self.gather_parameters()

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """All-gather every rank's updated parameters (one collective per dtype)."""
        for (dtype, device), per_rank in self._layout.items():
            sizes = [sum(p.numel() for p in ps) for ps in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            mine = torch.empty(width, dtype=dtype, device=device)  # the padding past sizes[rank] is never read
            if per_rank[self.rank]:
                torch.cat([p.detach().reshape(-1) for p in per_rank[self.rank]], out=mine[:sizes[self.rank]])
            gathered = torch.empty(width * self.world_size, dtype=dtype, device=device)
            _all_gather_into(gathered, mine, group=self.group)
            for r, ps in enumerate(per_rank):
                if r == self.rank:
                    continue
                offset = r * width
                for p in ps:
                    p.copy_(gathered[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def state_dict(self) -> dict:
        """This rank's shard: state of owned parameters under global indices, plus param_groups."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts the full state or any union of shards (any world size): keeps the owned entries."""
        owned = {self.index_of[id(p)] for p in self.params if self.owns(p)}
        state = {int(k): v for k, v in state_dict["state"].items() if int(k) in owned}
        self.inner.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})

    def state_bytes(self) -> int:
        """Bytes of optimizer-state tensors held by this rank."""
        return sum(v.numel() * v.element_size() for st in self.inner.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def clip_grad_norm_sharded(params, max_norm: float | None, group=None) -> torch.Tensor:
    """Global gradient norm when each rank holds a disjoint part of the gradients (ZeRO-2, FSDP
    local shards); scales them to `max_norm` when exceeded. Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for n in torch._foreach_norm(grads) if grads else []:
        sq += n.float() ** 2
    dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    if max_norm is not None and max_norm > 0 and grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def apply_zero(model: nn.Module, optimizer: torch.optim.Optimizer, *, stage: int = 1,
               bucket_mb: float = 25.0, op: str = "mean", group=None) -> tuple[BucketedDDP, ZeroOptimizer]:
    """Data parallelism with ZeRO stage 1 or 2: returns (gradient reducer, sharded optimizer)."""
    if stage not in (1, 2):
        raise ConfigError(f"ZeRO stage = {stage} must be 1 or 2 (stage 3 is FSDP: lmforge.distributed.fsdp)")
    zero = ZeroOptimizer(optimizer, group=group)
    owners = zero.owner_of if stage == 2 else None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in zero.owner_of]
    if missing:
        raise ConfigError(f"ZeRO: the optimizer does not hold parameters {missing[:3]} of the model")
    ddp = BucketedDDP(model, bucket_mb=bucket_mb, op=op, group=group, owners=owners)
    return ddp, zero
