"""The device mesh: dp × tp × pp × cp × ep sizes -> process groups, checks, and the order of application.

`ParallelConfig(dp, tp, pp, cp, ep)` says how many ways each dimension splits the work;
`check_parallel(pc, world_size, model_cfg)` refuses combinations that cannot work (or that are not
built/tested yet) with one message listing every problem; `build_mesh(pc)` makes the groups;
`parallelize(model, mesh)` applies the parallelisms in this documented order (torchtitan's):

1. pipeline (pp): keep this rank's stage of the layer stack (pipeline.py),
2. tensor + sequence parallel (tp): shard heads and MLP width (tensor_parallel.py),
3. expert parallel (ep): spread MoE experts (expert_parallel.py),
4. context parallel (cp): ring attention over the sequence (ring_attention.py),
5. data parallel (dp): FSDP2 over the dp mesh dimension ("fsdp") or our bucketed DDP ("ddp").

Rank layout, outer to inner: pp, dp, cp, tp: tensor-parallel ranks are adjacent (the same node, the
fastest links), pipeline stages farthest apart (they exchange the least). Expert parallelism does not
add ranks: it reuses the dp × cp ranks (each ep group is `ep` consecutive ranks of the same pp/tp
coordinates), so ep must divide dp·cp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

DIMS = ("pp", "dp", "cp", "tp")  # outer -> inner


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = True  # with tp > 1
    dp_kind: Literal["fsdp", "ddp"] = "fsdp"
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


def check_parallel(pc: ParallelConfig, world_size: int | None = None, model_cfg=None) -> None:
    """Raise one ConfigError listing every incompatibility of `pc` (with the world and the model)."""
    problems = []
    for name in ("dp", "tp", "pp", "cp", "ep"):
        if getattr(pc, name) < 1:
            problems.append(f"{name} = {getattr(pc, name)} must be >= 1")
    if problems:
        raise ConfigError("parallel config: " + "; ".join(problems))
    if world_size is not None and pc.world_size != world_size:
        problems.append(f"dp × tp × pp × cp = {pc.dp} × {pc.tp} × {pc.pp} × {pc.cp} = {pc.world_size} must "
                        f"equal the number of processes {world_size}")
    if (pc.dp * pc.cp) % pc.ep:
        problems.append(f"ep = {pc.ep} must divide dp × cp = {pc.dp * pc.cp} (experts spread over data/context ranks)")
    if pc.pp > 1 and max(pc.tp, pc.cp, pc.ep) > 1:
        problems.append("pp > 1 together with tp, cp or ep > 1 is not supported yet (pp × dp is)")
    if pc.pp > 1 and pc.dp > 1 and pc.dp_kind == "fsdp":
        problems.append("pp > 1 with dp_kind = 'fsdp' is not supported yet: use dp_kind = 'ddp'")
    if pc.cp > 1 and pc.tp > 1:
        problems.append("cp > 1 together with tp > 1 is not supported yet")
    if max(pc.cp, pc.ep) > 1 and pc.dp * pc.cp > 1 and pc.dp_kind == "fsdp":
        problems.append("cp or ep > 1 with dp_kind = 'fsdp' is not supported yet: use dp_kind = 'ddp' (the "
                        "mesh's own reducer over dp × cp, experts over their replicas)")
    if model_cfg is not None:
        m = model_cfg
        if pc.tp > 1:
            if m.n_heads % pc.tp or m.n_kv_heads % pc.tp:
                problems.append(f"tp = {pc.tp} must divide n_heads = {m.n_heads} and n_kv_heads = {m.n_kv_heads}")
            if m.moe is not None:
                problems.append("tp > 1 with MoE layers: use ep for the experts (tensor parallel MoE is not built)")
            if m.mla is not None or pc.cp > 1 and m.mla is not None:
                problems.append("tp > 1 with MLA attention is not supported")
            if m.d_ff is not None and m.d_ff % pc.tp:
                problems.append(f"tp = {pc.tp} must divide d_ff = {m.d_ff}")
            if pc.sequence_parallel and m.context_length % pc.tp:
                problems.append(f"sequence parallel: tp = {pc.tp} must divide context_length = {m.context_length}")
        if pc.ep > 1:
            if m.moe is None:
                problems.append(f"ep = {pc.ep} needs a MoE model (model.moe is not set)")
            elif m.moe.n_experts % pc.ep:
                problems.append(f"ep = {pc.ep} must divide moe.n_experts = {m.moe.n_experts}")
        if pc.pp > 1:
            if m.n_layers < pc.pp:
                problems.append(f"pp = {pc.pp} stages need at least as many layers (n_layers = {m.n_layers})")
            if m.mtp_depth:
                problems.append("pp > 1 with multi-token prediction (mtp_depth > 0) is not supported")
        if pc.cp > 1:
            if m.context_length % (2 * pc.cp):
                problems.append(f"cp = {pc.cp}: context_length = {m.context_length} must be a multiple of 2 × cp")
            if m.mla is not None:
                problems.append("cp > 1 with MLA attention is not supported")
            if m.attn_softcap is not None or any(m.layer_window(i) is not None for i in range(m.n_layers)):
                problems.append("cp > 1 with sliding windows or attention softcap is not supported (ring attention)")
    if problems:
        raise ConfigError("parallel config: " + "; ".join(problems))


@dataclass
class ParallelMesh:
    config: ParallelConfig
    rank: int
    coords: dict[str, int]  # this rank's index along pp, dp, cp, tp, and ep
    groups: dict[str, object] = field(default_factory=dict)  # dim -> process group (pp, dp, cp, tp, ep)
    device_mesh: object = None  # torch DeviceMesh over (pp, dp, cp, tp), for FSDP2


def rank_grid(pc: ParallelConfig) -> torch.Tensor:
    """[pp, dp, cp, tp] tensor of global ranks (tp fastest-varying)."""
    return torch.arange(pc.world_size).view(pc.pp, pc.dp, pc.cp, pc.tp)


def build_mesh(pc: ParallelConfig, device: str = "cpu", model_cfg=None) -> ParallelMesh:
    """Check `pc` against the world and the model, then create every group (collective: all ranks call it)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    check_parallel(pc, world, model_cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    grid = rank_grid(pc)
    where = (grid == rank).nonzero()[0].tolist()
    coords = dict(zip(DIMS, where))
    mesh = ParallelMesh(pc, rank, coords)
    if world == 1:
        coords["ep"] = 0
        return mesh
    mesh.device_mesh = init_device_mesh(device, tuple(getattr(pc, d) for d in DIMS), mesh_dim_names=DIMS)
    for d in DIMS:
        mesh.groups[d] = mesh.device_mesh.get_group(d)
    # the dp × cp ranks of each (pp, tp) coordinate see different tokens with the same parameters
    # ("batch"); ep groups are consecutive runs of `ep` of them, and the ranks holding the same
    # experts ("ep_replica": same ep coordinate) average those experts' gradients
    if pc.pp > 1:  # first and last stage of each pipeline (tied embeddings)
        ends = grid.permute(1, 2, 3, 0).reshape(-1, pc.pp)[:, [0, -1]]
        for pair in ends.tolist():
            group = dist.new_group(pair)
            if rank in pair:
                mesh.groups["pp_ends"] = group
    flat = grid.permute(0, 3, 1, 2).reshape(pc.pp * pc.tp, pc.dp * pc.cp)
    for row in flat:  # every rank creates every group, in the same order
        ranks = row.tolist()
        group = dist.new_group(ranks)
        if rank in ranks:
            mesh.groups["batch"] = group
        for chunk in row.split(pc.ep):
            ranks = chunk.tolist()
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.groups["ep"], coords["ep"] = group, ranks.index(rank)
        for i in range(pc.ep):
            ranks = row[i::pc.ep].tolist()
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.groups["ep_replica"] = group
    return mesh


class BatchGradReducer:
    """Data-parallel gradient mean over the dp × cp ranks for cp/ep meshes: replicated parameters
    are averaged over the "batch" group, expert parameters (this rank's experts only) are summed over
    their replicas and divided by the same dp·cp (their gradient already holds every rank's tokens,
    brought by the all-to-all). Call `finish()` after the backward."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh):
        from lmforge.distributed.expert_parallel import ExpertParallelMoE

        self.mesh, self.n = mesh, mesh.config.dp * mesh.config.cp
        expert = {id(m.w_in) for m in model.modules() if isinstance(m, ExpertParallelMoE)}
        expert |= {id(m.w_out) for m in model.modules() if isinstance(m, ExpertParallelMoE)}
        self.params = [(p, id(p) in expert) for p in model.parameters()]

    @torch.no_grad()
    def finish(self) -> None:
        for p, is_expert in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            group = self.mesh.groups["ep_replica" if is_expert else "batch"]
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.n)


def parallelize(model: nn.Module, mesh: ParallelMesh) -> tuple[nn.Module, object | None]:
    """Apply the parallelisms of `mesh` to a Transformer in the documented order.

    Returns (module to train, data-parallel handle or None). The module is a `PipelineStage` when
    pp > 1 (drive it with `pipeline.run_pipeline(..., reducer=handle)`); the handle is the DDP reducer (call its
    `finish()` after backward) when dp_kind = "ddp". With tp > 1 call `tensor_parallel.sync_tp_grads`
    after backward; with cp > 1 feed `ring_attention.shard_sequence` parts and sum the loss terms.
    """
    pc, g = mesh.config, mesh.groups
    check_parallel(pc, None, model.cfg)
    if pc.pp > 1:
        from lmforge.distributed.pipeline import PipelineStage

        model = PipelineStage(model, mesh.coords["pp"], pc.pp, group=g["pp"], tied_group=g.get("pp_ends"))
    if pc.tp > 1:
        from lmforge.distributed.tensor_parallel import apply_tp

        apply_tp(model, g["tp"], sequence_parallel=pc.sequence_parallel)
    if pc.ep > 1:
        from lmforge.distributed.expert_parallel import apply_ep

        apply_ep(model, g["ep"])
    if pc.cp > 1:
        from lmforge.distributed.ring_attention import apply_context_parallel

        apply_context_parallel(model, g["cp"])
    handle = None
    if max(pc.cp, pc.ep) > 1 and pc.dp * pc.cp > 1:
        handle = BatchGradReducer(model, mesh)
    elif pc.dp > 1:
        if pc.dp_kind == "fsdp":
            from lmforge.distributed.fsdp import apply_fsdp

            apply_fsdp(model, mesh=mesh.device_mesh["dp"])
        else:
            from lmforge.distributed.ddp import apply_ddp

            handle = apply_ddp(model, group=g["dp"])  # broadcasts from the dp group's first rank
    return model, handle
