"""The device mesh: dp × tp × pp × cp × ep sizes -> process groups, checks, and the order of application.

`ParallelConfig(dp, tp, pp, cp, ep)` says how many ways each dimension splits the work;
`check_parallel(pc, world_size, model_cfg)` refuses combinations that cannot work (or that are not
built/tested yet) with one message listing every problem; `build_mesh(pc)` makes the groups;
`parallelize(model, mesh)` applies the parallelisms in this documented order (torchtitan's):

1. pipeline (pp): keep this rank's stage (or v interleaved chunks) of the layer stack (pipeline.py),
2. tensor + sequence + vocab parallel (tp): shard heads, MLP width and the vocabulary
   (tensor_parallel.py, vocab_parallel.py); on a stage, the activations between stages are split
   along the sequence too,
3. expert parallel (ep): spread MoE experts (expert_parallel.py),
4. context parallel (cp): ring attention over the sequence (ring_attention.py); a stage then runs
   its zig-zag part of every sequence,
5. data parallel (dp): FSDP2 over the dp mesh dimension ("fsdp") or our bucketed DDP ("ddp"); with
   cp or ep > 1, `BatchGradReducer` over the dp × cp ranks.
Each later form works inside the pieces the earlier ones left (a stage's blocks, a TP shard), so the
pipeline split comes first and the data-parallel wrapper, which must see the final parameters, last.
After the backward, `GradSync.finish()` (the handle `parallelize` returns) reduces the data-parallel
gradients and sums the tensor-parallel partial ones; `pipeline.run_pipeline(reducer=handle)` calls it.

Supported: any product of dp, tp, pp, cp, ep except (refused by `check_parallel`, each with a
reason): cp × tp, tp × MoE (use ep), FSDP2 with pp, cp or ep (use dp_kind = "ddp"). Tested on gloo
against one process: dp × ep, FSDP2 × tp, pp × tp, pp × dp, pp × cp, pp × ep (dp 2 × ep 2),
interleaved pp × tp, and pp × dp × tp (8 ranks, slow).

Rank layout, outer to inner: pp, dp, cp, tp: tensor-parallel ranks are adjacent (the same node, the
fastest links), pipeline stages farthest apart (they exchange the least). Expert parallelism does not
add ranks: it reuses the dp × cp ranks (each ep group is `ep` consecutive ranks of the same pp/tp
coordinates), so ep must divide dp·cp.
"""

from __future__ import annotations

import contextlib
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
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    pp_virtual: int = 1  # model chunks per pipeline rank (interleaved schedule: >= 2)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


def check_parallel(pc: ParallelConfig, world_size: int | None = None, model_cfg=None) -> None:
    """Raise one ConfigError listing every incompatibility of `pc` (with the world and the model)."""
    problems = []
    for name in ("dp", "tp", "pp", "cp", "ep", "pp_virtual"):
        if getattr(pc, name) < 1:
            problems.append(f"{name} = {getattr(pc, name)} must be >= 1")
    if problems:
        raise ConfigError("parallel config: " + "; ".join(problems))
    if world_size is not None and pc.world_size != world_size:
        problems.append(f"dp × tp × pp × cp = {pc.dp} × {pc.tp} × {pc.pp} × {pc.cp} = {pc.world_size} must "
                        f"equal the number of processes {world_size}")
    if (pc.dp * pc.cp) % pc.ep:
        problems.append(f"ep = {pc.ep} must divide dp × cp = {pc.dp * pc.cp} (experts spread over data/context ranks)")
    if pc.pp > 1 and pc.dp > 1 and pc.dp_kind == "fsdp":
        problems.append("pp > 1 with dp_kind = 'fsdp' is not supported: FSDP2 would gather and free every "
                        "stage's parameters once per micro-batch; use dp_kind = 'ddp'")
    if pc.pp_schedule == "interleaved" and (pc.pp < 2 or pc.pp_virtual < 2):
        problems.append(f"pp_schedule = 'interleaved' needs pp >= 2 and pp_virtual >= 2 (got pp = {pc.pp}, "
                        f"pp_virtual = {pc.pp_virtual})")
    if pc.pp_schedule != "interleaved" and pc.pp_virtual != 1:
        problems.append(f"pp_virtual = {pc.pp_virtual} needs pp_schedule = 'interleaved'")
    if pc.cp > 1 and pc.tp > 1:
        problems.append("cp > 1 together with tp > 1 is not supported (sequence-parallel TP and the ring would "
                        "both split the sequence)")
    if max(pc.cp, pc.ep) > 1 and pc.dp > 1 and pc.dp_kind == "fsdp":
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
            if m.vocab_size < pc.tp:
                problems.append(f"vocab parallel: tp = {pc.tp} must not exceed vocab_size = {m.vocab_size}")
            if m.fused_loss:
                problems.append("tp > 1 with model.fused_loss: the vocab-parallel cross-entropy replaces the "
                                "fused kernel, set fused_loss = false")
            if m.mtp_depth:
                problems.append("tp > 1 with multi-token prediction (mtp_depth > 0) is not supported")
        if pc.ep > 1:
            if m.moe is None:
                problems.append(f"ep = {pc.ep} needs a MoE model (model.moe is not set)")
            elif m.moe.n_experts % pc.ep:
                problems.append(f"ep = {pc.ep} must divide moe.n_experts = {m.moe.n_experts}")
        if pc.pp > 1:
            if m.n_layers < pc.pp * pc.pp_virtual:
                problems.append(f"pp = {pc.pp} stages × pp_virtual = {pc.pp_virtual} chunks need at least as many "
                                f"layers (n_layers = {m.n_layers})")
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
    links: dict = field(default_factory=dict)  # this rank's pipeline message groups (pipeline_links)


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
    if pc.pp > 1:  # per pipeline: its message streams, and its first and last stage (tied embeddings)
        from lmforge.distributed.pipeline import pipeline_links

        for ranks in grid.permute(1, 2, 3, 0).reshape(-1, pc.pp).tolist():
            links = pipeline_links(ranks)
            pair = dist.new_group([ranks[0], ranks[-1]])
            if rank in ranks:
                mesh.links = links
            if rank in (ranks[0], ranks[-1]):
                mesh.groups["pp_ends"] = pair
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
    """Data-parallel gradient reduction over the dp × cp ranks for cp/ep meshes. Each rank's loss is
    its data-parallel replica's loss (cp = 1), or its share of it: ce over its sequence part divided
    by the replica's whole token count, so the cp ranks' losses sum to the replica's. Replicated
    parameters are summed over the "batch" group and divided by dp (mean over replicas of the sum
    over cp); expert parameters (this rank's experts only) are summed over their replicas and divided
    by the same dp (their gradient already holds every rank's tokens, brought by the all-to-all).
    Call `finish()` after the backward; it communicates only there (`no_sync` changes nothing)."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh):
        from lmforge.distributed.expert_parallel import ExpertParallelMoE

        self.mesh, self.n = mesh, mesh.config.dp
        expert = {id(m.w_in) for m in model.modules() if isinstance(m, ExpertParallelMoE)}
        expert |= {id(m.w_out) for m in model.modules() if isinstance(m, ExpertParallelMoE)}
        self.params = [(p, id(p) in expert) for p in model.parameters()]

    def no_sync(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def finish(self) -> None:
        for p, is_expert in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            group = self.mesh.groups["ep_replica" if is_expert else "batch"]
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.n)


class GradSync:
    """The gradient work after a step's backward on a mesh: `data` (our DDP, a BatchGradReducer, or
    None with FSDP2, which reduces inside the backward) and the tensor-parallel partial sums
    (`sync_tp_grads`). `no_sync()` defers the data-parallel part (gradient accumulation, pipeline
    micro-batches); `finish()` does both (the order does not matter: both are sums)."""

    def __init__(self, model: nn.Module, data=None, tp_group=None):
        self.model, self.data, self.tp_group = model, data, tp_group

    def no_sync(self):
        return self.data.no_sync() if self.data is not None else contextlib.nullcontext()

    def finish(self) -> None:
        if self.data is not None:
            self.data.finish()
        if self.tp_group is not None:
            from lmforge.distributed.tensor_parallel import sync_tp_grads

            sync_tp_grads(self.model, self.tp_group)


def parallelize(model: nn.Module, mesh: ParallelMesh) -> tuple[nn.Module, GradSync | None]:
    """Apply the parallelisms of `mesh` to a Transformer in the documented order.

    Returns (module to train, GradSync or None). The module is a `PipelineStage` when pp > 1 (drive
    it with `pipeline.run_pipeline(..., reducer=handle)`, which calls `handle.finish()`); otherwise
    call `handle.finish()` after the backward. With cp > 1 (and no pp) feed each rank its
    `ring_attention.shard_sequence` part with zig-zag positions; its loss is its share (ce_sum over
    the replica's whole token count, see BatchGradReducer).
    """
    pc, g = mesh.config, mesh.groups
    check_parallel(pc, None, model.cfg)
    inner = model  # the Transformer (a stage's share of it) that the other forms change
    if pc.pp > 1:
        from lmforge.distributed.pipeline import PipelineStage

        model = PipelineStage(model, mesh.coords["pp"], pc.pp, group=g["pp"], tied_group=g.get("pp_ends"),
                              virtual=pc.pp_virtual, links=mesh.links)
        inner = model.model
    if pc.tp > 1:
        from lmforge.distributed.tensor_parallel import apply_tp

        apply_tp(inner, g["tp"], sequence_parallel=pc.sequence_parallel)
        if pc.pp > 1 and pc.sequence_parallel:
            model.seq_split = pc.tp
    if pc.ep > 1:
        from lmforge.distributed.expert_parallel import apply_ep

        apply_ep(inner, g["ep"], require=pc.pp == 1)  # a stage may hold only dense layers
    if pc.cp > 1:
        from lmforge.distributed.ring_attention import apply_context_parallel

        apply_context_parallel(inner, g["cp"])
        if pc.pp > 1:
            model.cp_group = g["cp"]
    data = None
    if max(pc.cp, pc.ep) > 1 and pc.dp * pc.cp > 1:
        data = BatchGradReducer(model, mesh)
    elif pc.dp > 1:
        if pc.dp_kind == "fsdp":
            from lmforge.distributed.fsdp import apply_fsdp

            apply_fsdp(model, mesh=mesh.device_mesh["dp"])
        else:
            from lmforge.distributed.ddp import apply_ddp

            data = apply_ddp(model, group=g["dp"])  # broadcasts from the dp group's first rank
    tp_group = g["tp"] if pc.tp > 1 else None
    if data is None and tp_group is None:
        return model, None
    return model, GradSync(inner, data, tp_group)
