"""Tensor parallelism (Megatron) with sequence parallelism, written with explicit collectives.

`apply_tp(model, group, sequence_parallel=True) -> model` changes a Transformer in place, keeping its
parameter names (so checkpoints map by slicing):
- attention: q/k/v are column-parallel (each rank keeps n_heads/W query heads and n_kv_heads/W kv
  heads, the rows of their weights), the output projection `o` row-parallel (the matching columns);
- MLP: gate/up column-parallel (d_ff/W rows each), down row-parallel;
- entering each attention/MLP the input is made whole on every rank, leaving it the rank-partial
  outputs are summed. Without sequence parallelism that is identity-forward/all-reduce-backward in,
  all-reduce out, and everything between the blocks (norms, residuals, dropout) is replicated. With
  sequence parallelism (Korthikanti et al. 2022) the activations between the TP regions are split
  along the sequence: all-gather in, reduce-scatter out, so norms and dropout run on T/W tokens per
  rank and hold 1/W of those activations. The same bytes move as with the all-reduce (an all-reduce
  is a reduce-scatter plus an all-gather).
- vocab parallelism (vocab_parallel.py, on by default): the embedding, the output head and the
  cross-entropy are split by vocabulary rows; the logits the model returns are this rank's columns.
- with sequence parallelism the model splits the embedding output along the sequence before the
  first block; the head all-gathers it (vocab parallel: the final norm runs on T/W tokens) or, with
  `vocab_parallel=False`, the last block's output is gathered and the head is replicated.
- on a pipeline stage (`model.layer_ids`, set by PipelineStage: the global indices of its blocks)
  the split happens only where layer 0 is and the gather only where the last layer is, so the
  activations sent between stages are this rank's sequence part ([B, T/W, d]).

Replicated parameters that see only part of the computation on each rank (block norms under
sequence parallelism, row-parallel biases, QK-norm weights) get partial gradients: call
`sync_tp_grads(model, group)` after the backward (once per optimizer step, like DDP's finish).
On gloo (CPU tests) reduce-scatter is an all-reduce followed by keeping this rank's slice.

Not here: MoE layers (use expert parallelism), latent attention (MLA), kv heads fewer than ranks,
DTensor placements (`parallelize_module`). FSDP2 composes (mesh.py, 2-D test).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

# ----------------------------------------------------------------------------- collectives

def _world(group) -> int:
    return dist.get_world_size(group)


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    w, r = _world(group), dist.get_rank(group)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x.chunk(w, dim)[r].contiguous()
    parts = list(x.chunk(w, dim))
    out = torch.empty_like(parts[r])
    dist.reduce_scatter(out, [p.contiguous() for p in parts], group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyIn(torch.autograd.Function):
    """Replicated input into a TP region: identity forward, sum the ranks' gradients backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceOut(torch.autograd.Function):
    """Partial outputs of a TP region summed; the (replicated) gradient passes through."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherIn(torch.autograd.Function):
    """Sequence-parallel input into a TP region: all-gather forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ScatterOut(torch.autograd.Function):
    """Partial outputs of a TP region summed and split along the sequence (reduce-scatter); the
    gradient all-gathered."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _Split(torch.autograd.Function):
    """Replicated tensor -> this rank's sequence slice; the gradient of the whole is all-gathered."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return x.chunk(_world(group), dim)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _GatherReplicated(torch.autograd.Function):
    """Sequence slices -> the replicated whole; every rank computes the same loss from it, so the
    backward keeps this rank's slice of the (identical) gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(_world(ctx.group), ctx.dim)[dist.get_rank(ctx.group)].contiguous(), None, None


# ----------------------------------------------------------------------------- layers

class RowParallelLinear(nn.Module):
    """y = reduce(x_local W_localᵀ) + b: W holds this rank's input columns; b is added once, after
    the reduction (an all-reduce, or a reduce-scatter over the sequence). Parameter names stay
    `weight` / `bias`."""

    def __init__(self, linear: nn.Module, group, sequence_parallel: bool):
        super().__init__()
        w, r = _world(group), dist.get_rank(group)
        d_in = linear.weight.shape[1]
        if d_in % w:
            raise ConfigError(f"tensor parallel: row-parallel input width {d_in} is not divisible by tp = {w}")
        self.weight = nn.Parameter(linear.weight.detach().chunk(w, 1)[r].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if self.bias is not None and sequence_parallel:
            self.bias._tp_partial_grad = True
        self.group, self.sp = group, sequence_parallel

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = _ScatterOut.apply(y, 1, self.group) if self.sp else _ReduceOut.apply(y, self.group)
        return y if self.bias is None else y + self.bias


def _shard_rows(linear: nn.Module, rows: torch.Tensor) -> None:
    """Keep output rows `rows` of a Linear (column parallelism), in place."""
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    if hasattr(linear, "d_out"):
        linear.d_out = len(rows)


def _head_rows(rank: int, world: int, n_heads: int, head_dim: int) -> torch.Tensor:
    per = n_heads // world
    return torch.arange(rank * per * head_dim, (rank + 1) * per * head_dim)


def _enter_hook(group, sp: bool):
    def hook(module, args):
        x = args[0]
        x = _GatherIn.apply(x, 1, group) if sp else _CopyIn.apply(x, group)
        return (x, *args[1:])

    return hook


def apply_tp(model: nn.Module, group=None, sequence_parallel: bool = True, vocab_parallel: bool = True) -> nn.Module:
    """Shard a Transformer's attention heads, MLP width and (by default) vocabulary over `group` (see
    the module docstring)."""
    from lmforge.model.attention import Attention
    from lmforge.model.layers import MLP

    cfg = model.cfg
    w, r = _world(group), dist.get_rank(group)
    if cfg.n_heads % w or cfg.n_kv_heads % w:
        raise ConfigError(f"tensor parallel: n_heads = {cfg.n_heads} and n_kv_heads = {cfg.n_kv_heads} must "
                          f"both be divisible by tp = {w}")
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, Attention):
            raise ConfigError(f"tensor parallel: block {i} attention is {type(attn).__name__}; only "
                              "Attention (MHA/GQA) is supported")
        if not isinstance(mlp, MLP):
            raise ConfigError(f"tensor parallel: block {i} feed-forward is {type(mlp).__name__}; MoE layers "
                              "need expert parallelism (expert_parallel.py), not tensor parallelism")
        _shard_rows(attn.q, _head_rows(r, w, attn.n_heads, attn.head_dim))
        _shard_rows(attn.k, _head_rows(r, w, attn.n_kv_heads, attn.head_dim))
        _shard_rows(attn.v, _head_rows(r, w, attn.n_kv_heads, attn.head_dim))
        attn.o = RowParallelLinear(attn.o, group, sequence_parallel)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // w, attn.n_kv_heads // w
        for norm in (attn.q_norm, attn.k_norm):  # shared by the heads of every rank
            if norm is not None:
                for p in norm.parameters():
                    p._tp_partial_grad = True
        d_ff = mlp.up.weight.shape[0]
        if d_ff % w:
            raise ConfigError(f"tensor parallel: d_ff = {d_ff} is not divisible by tp = {w}")
        rows = torch.arange(r * d_ff // w, (r + 1) * d_ff // w)
        for lin in (mlp.gate, mlp.up):
            if lin is not None:
                _shard_rows(lin, rows)
        mlp.down = RowParallelLinear(mlp.down, group, sequence_parallel)
        attn.register_forward_pre_hook(_enter_hook(group, sequence_parallel))
        mlp.register_forward_pre_hook(_enter_hook(group, sequence_parallel))
        if sequence_parallel:  # norms and biases between the TP regions see only this rank's tokens
            for name, p in block.named_parameters():
                if not name.startswith(("attn.", "mlp.")):
                    p._tp_partial_grad = True
    if vocab_parallel:
        from lmforge.distributed.vocab_parallel import apply_vocab_parallel

        apply_vocab_parallel(model, group, sequence_parallel)
    ids = list(getattr(model, "layer_ids", range(len(model.blocks))))  # global block indices
    if sequence_parallel and 0 in ids:
        def split(module, args):
            x = args[0]
            if x.shape[1] % w:
                raise ConfigError(f"sequence parallel: sequence length {x.shape[1]} is not divisible by tp = {w}")
            return (_Split.apply(x, 1, group), *args[1:])

        model.blocks[ids.index(0)].register_forward_pre_hook(split)
    if sequence_parallel and not vocab_parallel and cfg.n_layers - 1 in ids:
        def gather(module, args, out):
            return (_GatherReplicated.apply(out[0], 1, group), *out[1:])

        model.blocks[ids.index(cfg.n_layers - 1)].register_forward_hook(gather)
    # kept by name: FSDP2 replaces the Parameter objects (and their attributes), not the names
    model._tp_partial_names = {n for n, p in model.named_parameters() if getattr(p, "_tp_partial_grad", False)}
    return model


def sync_tp_grads(model: nn.Module, group=None) -> None:
    """Sum the partial gradients of replicated parameters over the tensor-parallel group."""
    partial = getattr(model, "_tp_partial_names", set())
    for name, p in model.named_parameters():
        if name in partial and p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2's DTensor shard
            dist.all_reduce(grad, group=group)


def tp_reference_shard(name: str, full: torch.Tensor, model: nn.Module, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the unsharded parameter `name` (for tests and checkpoint conversion)."""
    cfg = model.cfg
    leaf = name.split(".")[-2:]
    hd = cfg.head_dim
    if leaf[0] in ("tok_emb", "lm_head") and hasattr(model, "_vocab_group"):
        from lmforge.distributed.vocab_parallel import vocab_range

        start, end = vocab_range(cfg.vocab_size, rank, world)
        return full[start:end]
    if leaf[0] in ("q", "k", "v"):
        heads = cfg.n_heads if leaf[0] == "q" else cfg.n_kv_heads
        return full[_head_rows(rank, world, heads, hd)]
    if leaf[0] in ("gate", "up"):
        return full.chunk(world, 0)[rank]
    if leaf[0] in ("o", "down") and leaf[1] == "weight":
        return full.chunk(world, 1)[rank]
    return full
