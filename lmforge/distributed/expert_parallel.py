"""Expert parallelism: a MoE layer's experts spread over ranks, tokens moved with all-to-all.

`apply_ep(model, group) -> model` turns every MoE layer (model/moe.py) of a model into an
`ExpertParallelMoE` in place (parameter names kept; `w_in` / `w_out` hold only this rank's experts,
experts r·E/W .. (r+1)·E/W − 1). The router and shared experts stay replicated. Each rank routes its
OWN tokens (expert parallelism rides on data parallelism: ranks see different batches):

1. route and sort assignments by expert exactly as the single-process layer does; the capacity
   limit (`capacity_factor`) applies per rank, to this rank's tokens (so this rank's output equals
   the single-process MoE run on this rank's batch);
2. all-to-all the per-expert counts, then the token rows and their gates (dispatch);
3. regroup the received rows (source-major) by local expert and run the local experts;
4. all-to-all the outputs back (combine) and sum each token's k expert outputs.
The all-to-alls are autograd functions (backward: the reverse all-to-all), so the layer trains.

Metrics add the load statistics over the whole group: "expert_load_global" (fraction of all ranks'
assignments per expert) and "rank_load" (fraction of the group's kept assignments each rank's
experts process). The router's gradient is per-rank (sum or average it with data parallelism) and
the aux-loss-free `load_counts` are this rank's (the DP layer sums them before the bias update).

Not here: token dropping by a global (cross-rank) capacity, overlapping the all-to-all with expert
compute, hierarchical (intra/inter-node) all-to-all.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.moe import MoE, _Combine, _Dispatch


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), ...] -> rows [sum(recv), ...]; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.send_splits), *g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def expert_major(counts: torch.Tensor) -> torch.Tensor:
    """counts [W, E_local] of rows received source-major (all of rank 0's rows by expert, then rank
    1's, ...) -> the permutation that lists them expert-major (expert 0 from every source, ...)."""
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view_as(counts).t().reshape(-1)
    lens = counts.t().reshape(-1)
    block_start = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return torch.repeat_interleave(starts, lens) + torch.arange(int(lens.sum()), device=counts.device) - block_start


class ExpertParallelMoE(MoE):
    """The MoE layer with experts on the ranks of `group` (built by `from_moe`, not __init__)."""

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> ExpertParallelMoE:
        w, r = dist.get_world_size(group), dist.get_rank(group)
        e = moe.cfg.n_experts
        if e % w:
            raise ConfigError(f"expert parallel: n_experts = {e} is not divisible by ep = {w}")
        ep = cls.__new__(cls)
        ep.__dict__.update(moe.__dict__)
        ep.group, ep.ep_size, ep.ep_rank, ep.n_local = group, w, r, e // w
        local = slice(r * ep.n_local, (r + 1) * ep.n_local)
        ep.w_in = nn.Parameter(moe.w_in.detach()[local].clone())
        ep.w_out = nn.Parameter(moe.w_out.detach()[local].clone())
        ep.comm_s = 0.0  # seconds spent in the all-to-alls (benchmarks read it)
        return ep

    def _a2a(self, x, recv, send):
        start = time.perf_counter()
        out = _AllToAll.apply(x, recv, send, self.group)
        self.comm_s += time.perf_counter() - start
        return out

    def forward(self, x: torch.Tensor):
        cfg, (b, t, d) = self.cfg, x.shape
        flat = x.reshape(-1, d)
        k, w, el = cfg.top_k, self.ep_size, self.n_local
        p = self.plan(flat)
        token, source, kept = p.token, p.source, p.kept_counts
        x_sorted = _Dispatch.apply(flat, token, source, k)
        g_sorted = p.gates_sorted

        # dispatch: experts are contiguous per rank, so sorted rows split by destination as they are
        recv_counts = torch.empty_like(kept)
        dist.all_to_all_single(recv_counts, kept.contiguous(), group=self.group)
        recv_counts = recv_counts.view(w, el)  # [source rank, local expert]
        send = kept.view(w, el).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        x_recv = self._a2a(x_sorted, recv, send)
        g_recv = self._a2a(g_sorted, recv, send)
        perm = expert_major(recv_counts)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        y_local = self.experts(x_recv.index_select(0, perm), recv_counts.sum(0), g_recv.index_select(0, perm))
        # combine: back to source-major, back to the sending ranks, then each token's k outputs summed
        y_sorted = self._a2a(y_local.index_select(0, inverse), send, recv)
        y = _Combine.apply(y_sorted, token, source, k)
        if self.shared_in is not None:
            y = y + self.shared(flat)

        aux, metrics = self.losses_and_metrics(p, b)
        stats = torch.cat([p.counts, kept.view(w, el).sum(1)]).float()
        dist.all_reduce(stats, group=self.group)
        metrics["expert_load_global"] = (stats[:cfg.n_experts] / stats[:cfg.n_experts].sum()).detach()
        metrics["rank_load"] = (stats[cfg.n_experts:] / stats[cfg.n_experts:].sum().clamp_min(1)).detach()
        return y.view(b, t, d), aux, metrics


def apply_ep(model: nn.Module, group=None, require: bool = True) -> nn.Module:
    """Replace every MoE layer of `model` by its expert-parallel version (in place; returns model).
    `require=False` accepts a model without MoE layers (a pipeline stage of dense layers only)."""
    found = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, name, ExpertParallelMoE.from_moe(child, group))
                found += 1
    if not found and require:
        raise ConfigError("expert parallel: the model has no MoE layers (set model.moe)")
    return model
