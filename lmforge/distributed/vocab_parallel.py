"""Vocab parallelism (Megatron): the token embedding, output head and cross-entropy split over the
tensor-parallel ranks by vocabulary rows, without ever gathering the full [tokens, V] logits.

Rank r of a group of W holds vocabulary rows `vocab_range(V, r, W)`: V/W rows, the first V % W ranks
one more (no padding rows: a vocab that does not divide evenly just gives uneven shards).

- `VocabParallelEmbedding`: each rank looks up the ids it owns (zero rows for the others) and the
  partial embeddings are summed with an all-reduce; backward: the (replicated) gradient passes
  through unchanged and each rank scatter-adds it into its own rows only.
- `vocab_parallel_cross_entropy(logits_local, targets, vocab_start, group)`: per-token CE and
  log-sum-exp from this rank's logit columns. Forward: the max over the vocabulary is an all-reduce
  MAX of the local maxima; the sum of exp(logit − max) and the target's logit (held by exactly one
  rank, zero elsewhere) are one all-reduce SUM of two numbers per token; then
  lse = log(sum) + max, ce = lse − logit[target]. Backward, written here, needs no communication:
  d ce / d logit_j = softmax_j − [j = target] on the rank's own columns (softmax_j = exp(logit_j −
  lse) from the global sum), and a z-loss gradient through lse adds softmax_j · d lse.
- `apply_vocab_parallel(model, group, sequence_parallel)`: replaces a Transformer's `tok_emb` by the
  vocab-parallel embedding, keeps this rank's rows of an untied `lm_head` (a tied head uses the
  embedding shard), and gives the model instance a `head` (its input made whole on every rank: an
  all-gather of the sequence under sequence parallelism, else identity; backward sums the ranks'
  partial input gradients) and a `loss_terms` that use the vocab-parallel loss. The logits it
  returns are this rank's vocabulary columns (`gather_vocab` makes them whole, e.g. to sample).

Memory: each rank holds [tokens, V/W] logits (plus the fp32 softmax saved for backward) instead of
[tokens, V]. Not here: the fused chunked linear+CE kernel (model.fused_loss, refused), multi-token
prediction heads (refused).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers import Embedding, softcap, upcast


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) rows of the vocabulary held by `rank` (the first V % W ranks get one more)."""
    if vocab_size < world:
        raise ConfigError(f"vocab parallel: vocab_size = {vocab_size} is smaller than tp = {world}")
    base, extra = divmod(vocab_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_vocab(logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """This rank's logit columns [..., V_r] -> the whole [..., V] (an all-gather; shards may differ
    by one column, so they travel padded to the largest)."""
    w = dist.get_world_size(group)
    width = vocab_range(vocab_size, 0, w)[1]  # rank 0's shard is the largest
    pad = torch.zeros(*logits.shape[:-1], width, dtype=logits.dtype, device=logits.device)
    pad[..., :logits.shape[-1]] = logits
    parts = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(parts, pad.contiguous(), group=group)
    sizes = [end - start for start, end in (vocab_range(vocab_size, r, w) for r in range(w))]
    return torch.cat([part[..., :n] for part, n in zip(parts, sizes)], -1)


class VocabParallelEmbedding(Embedding):
    """Rows [start, end) of an embedding table; forward returns the whole (all-reduced) embedding."""

    def __init__(self, full: Embedding, group):
        nn.Module.__init__(self)
        w, r = dist.get_world_size(group), dist.get_rank(group)
        self.num, self.dim = full.num, full.dim  # the whole table's size (as Embedding reports it)
        self.start, self.end = vocab_range(full.num, r, w)
        self.weight = nn.Parameter(full.weight.detach()[self.start:self.end].clone())
        self.group = group

    def reset_parameters(self, std: float) -> None:
        from lmforge.model.layers import trunc_normal_

        trunc_normal_(self.weight, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from lmforge.distributed.tensor_parallel import _ReduceOut

        local = ids - self.start
        mine = (local >= 0) & (local < self.end - self.start)
        rows = self.weight[local.clamp(0, self.end - self.start - 1)]
        rows = rows * mine.unsqueeze(-1).to(rows.dtype)  # ids of other ranks contribute zeros
        return _ReduceOut.apply(rows, self.group)

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}, rows [{self.start}, {self.end})"


class _VocabParallelCE(torch.autograd.Function):
    """(logits [..., V_r] of rows [start, start + V_r), targets [...]) -> (ce [...], lse [...])."""

    @staticmethod
    def forward(ctx, logits, targets, start: int, group, ignore_index: int):
        x = upcast(logits)
        n_local = x.shape[-1]
        m = x.detach().amax(-1)  # the max only keeps exp() in range: no gradient through it
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m.unsqueeze(-1))
        valid = targets != ignore_index
        local = targets - start
        mine = valid & (local >= 0) & (local < n_local)
        idx = local.clamp(0, n_local - 1)
        picked = torch.where(mine, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(m))
        sums = torch.stack([e.sum(-1), picked])  # one all-reduce for both
        dist.all_reduce(sums, group=group)
        lse = torch.log(sums[0]) + m
        ce = torch.where(valid, lse - sums[1], torch.zeros_like(lse))
        softmax = e.div_(sums[0].unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, valid)
        ctx.dtype = logits.dtype
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        softmax, idx, mine, valid = ctx.saved_tensors
        g_ce = torch.zeros_like(softmax[..., 0]) if g_ce is None else torch.where(valid, g_ce, 0.0)
        g_lse = torch.zeros_like(g_ce) if g_lse is None else g_lse
        grad = softmax * (g_ce + g_lse).unsqueeze(-1)  # d ce/d lse = 1 (valid tokens), d z/d lse = g_lse
        grad.scatter_add_(-1, idx.unsqueeze(-1), -(g_ce * mine).unsqueeze(-1))  # − [j = target]
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group=None,
                                 ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and log-sum-exp over the WHOLE vocabulary from this rank's columns
    (`logits[..., j]` is vocabulary row `vocab_start + j`); 0 CE where target == ignore_index. Both
    results are the same on every rank of `group`; float32 (float64 stays float64)."""
    if logits.shape[:-1] != targets.shape:
        raise ConfigError(f"vocab parallel CE: logits {tuple(logits.shape)} do not match targets "
                          f"{tuple(targets.shape)}")
    return _VocabParallelCE.apply(logits, targets, vocab_start, group, ignore_index)


# ----------------------------------------------------------------------------- the model

def _head(self, x: torch.Tensor) -> torch.Tensor:
    """Normed hidden states -> this rank's logit columns (replaces Transformer.head on the instance)."""
    from lmforge.distributed.tensor_parallel import _CopyIn, _GatherIn

    group = self._vocab_group
    x = _GatherIn.apply(x, 1, group) if self._vocab_sp else _CopyIn.apply(x, group)
    logits = x @ self.tok_emb.weight.t() if self.lm_head is None else self.lm_head(x)
    return softcap(logits, self.cfg.final_softcap)


def _loss_terms(self, h: torch.Tensor, targets: torch.Tensor, z_loss: float | None = None):
    """Transformer.loss_terms with the vocab-parallel CE: (local logits, ce_sum, n_tokens, z_sum)."""
    z_loss = self.cfg.z_loss if z_loss is None else z_loss
    logits = self.head(h)
    ce, lse = vocab_parallel_cross_entropy(logits, targets, self._vocab_start, self._vocab_group)
    valid = targets != -100
    z_sum = (lse.square() * valid).sum() if z_loss > 0 else None
    return logits, ce.sum(), valid.sum(), z_sum


def apply_vocab_parallel(model: nn.Module, group=None, sequence_parallel: bool = True) -> nn.Module:
    """Split a Transformer's embedding and output head by vocabulary rows over `group` (in place).

    Works on a pipeline stage's model too: whichever of `tok_emb` / `lm_head` it still holds is split.
    `sequence_parallel`: the hidden states reaching the head are split along the sequence (tensor
    parallelism with SP) and are all-gathered there; the final norm before it then sees only this
    rank's tokens, so its weights are marked for `sync_tp_grads`.
    """
    cfg = model.cfg
    if cfg.fused_loss:
        raise ConfigError("vocab parallelism (tp > 1) computes its own cross-entropy: set model.fused_loss "
                          "= false (each rank holds only V/tp logit columns, which is the memory saving)")
    if getattr(cfg, "mtp_depth", 0):
        raise ConfigError("vocab parallelism (tp > 1) with multi-token prediction (mtp_depth > 0) is not supported")
    w, r = dist.get_world_size(group), dist.get_rank(group)
    start, end = vocab_range(cfg.vocab_size, r, w)
    if model.tok_emb is not None:
        model.tok_emb = VocabParallelEmbedding(model.tok_emb, group)
    if model.lm_head is not None:
        from lmforge.distributed.tensor_parallel import _shard_rows

        _shard_rows(model.lm_head, torch.arange(start, end))
    if sequence_parallel:
        for p in model.norm_f.parameters():
            p._tp_partial_grad = True
    model._vocab_group, model._vocab_sp, model._vocab_start = group, sequence_parallel, start
    model.head = types.MethodType(_head, model)
    model.loss_terms = types.MethodType(_loss_terms, model)
    return model
