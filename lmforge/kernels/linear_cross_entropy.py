"""Chunked fused linear + cross-entropy: the LM head's loss without the (tokens x vocab) logits.

`linear_cross_entropy(hidden [N,H], weight [V,H], targets [N])` returns the summed cross-entropy
over targets != ignore_index (optionally with a tanh logit softcap and a z-loss term lse^2), and
never holds more than one chunk of logits: for each chunk of rows it computes the logits with one
matmul, the loss and d(loss)/d(logits) in place (Triton kernel `linear_cross_entropy_triton`, or the
torch twin `ce_chunk_reference`), then immediately dhidden = g @ W and dW += g^T @ h. The gradients
are thus computed in the forward (as in Liger-Kernel) and only scaled by the incoming gradient in
backward: 3 matmuls in total, like the unfused loss, with peak memory ~ one chunk of logits plus dW
(plus a zero-padded copy of the weight when the vocabulary is not a multiple of VOCAB_ALIGN).

`linear_cross_entropy_reference` is the spec (full logits, fp32 softmax). dW is accumulated in fp32
across chunks and returned in the weight's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmforge.kernels.runtime import KernelInputError, choose_impl


class LinearCEResult(NamedTuple):
    loss_sum: torch.Tensor  # ce_sum + z_loss * z_sum: differentiable, fp32 scalar
    ce_sum: torch.Tensor    # sum of per-token cross-entropy (detached)
    z_sum: torch.Tensor     # sum of per-token lse^2 (detached)
    n_tokens: torch.Tensor  # number of targets != ignore_index


def linear_cross_entropy_reference(hidden, weight, targets, *, ignore_index=-100, softcap=None, z_loss=0.0):
    """The spec: full logits in fp32, log-softmax, gather. Returns LinearCEResult (loss_sum has grad)."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, -1)
    valid = targets != ignore_index
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ce_sum = ((lse - picked) * valid).sum()
    z_sum = (lse.pow(2) * valid).sum()
    return LinearCEResult(ce_sum + z_loss * z_sum, ce_sum.detach(), z_sum.detach(), valid.sum())


def ce_chunk_reference(logits, targets, ignore_index, softcap, z_loss):
    """Per-row (ce, z) of one chunk; overwrites `logits` with d(ce + z_loss * z)/d(logits).

    The torch twin of the Triton kernel; rows with target == ignore_index get zero loss and gradient.
    """
    x = logits.float()
    t = None
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = softcap * t
    lse = torch.logsumexp(x, -1)
    valid = targets != ignore_index
    tgt = targets.clamp(min=0)
    ce = (lse - x.gather(1, tgt[:, None])[:, 0]) * valid
    z = lse.pow(2) * valid
    grad = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None])
    grad[torch.arange(len(tgt), device=grad.device), tgt] -= 1.0
    grad *= valid[:, None]
    if t is not None:
        grad *= 1.0 - t * t
    logits.copy_(grad)
    return ce, z


# Vocab sizes are padded to a multiple of this inside the loss (a zero-padded copy of the weight):
# cuBLAS runs bf16 matmuls with an odd vocabulary dimension (GPT-2's 50257) on much slower kernels.
VOCAB_ALIGN = 128
CHUNK_BUDGET = 1 << 28  # logits per chunk (512 MiB in bf16)


def default_chunk_rows(n: int, v: int, budget: int | None = None) -> int:
    """Rows per chunk: a power of two with about `budget` logits per chunk.

    Each chunk costs one read-modify-write of dW, so chunks should be large; the budget bounds memory.
    """
    rows = max(1, (budget or CHUNK_BUDGET) // v)
    return min(n, 1 << (rows.bit_length() - 1))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, z_loss, chunk_rows, path):
        n, v = hidden.shape[0], weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vp = -(-v // VOCAB_ALIGN) * VOCAB_ALIGN
        # Zero rows: their logits are 0 and never read by the loss, and they add 0 to dhidden.
        w = weight if vp == v else torch.nn.functional.pad(weight, (0, 0, 0, vp - v))
        dh = torch.empty_like(hidden) if need_dh else None
        # dW accumulates in the weight's dtype through cuBLAS (fp32 inside each matmul, one rounding
        # per chunk): a separate fp32 accumulator would cost a full extra pass over dW per chunk.
        dw = torch.empty_like(w) if need_dw else None
        ce = torch.empty(n, device=hidden.device, dtype=torch.float32)
        z = torch.empty(n, device=hidden.device, dtype=torch.float32)
        buf = torch.empty(min(chunk_rows, n), vp, device=hidden.device, dtype=hidden.dtype)
        if path == "triton":
            from lmforge.kernels import linear_cross_entropy_triton as kt
        chunk_ce = kt.ce_chunk if path == "triton" else ce_chunk_reference
        for r0 in range(0, n, chunk_rows):
            h = hidden[r0:r0 + chunk_rows]
            logits = buf[:len(h)]  # becomes d(loss)/d(logits) in place
            torch.mm(h, w.T, out=logits)
            ce[r0:r0 + len(h)], z[r0:r0 + len(h)] = chunk_ce(logits[:, :v], targets[r0:r0 + chunk_rows],
                                                             ignore_index, softcap, z_loss)
            if need_dh:
                torch.mm(logits, w, out=dh[r0:r0 + len(h)])
            if need_dw and r0 == 0:
                torch.mm(logits.T, h, out=dw)
            elif need_dw:
                dw.addmm_(logits.T, h)
        ctx.save_for_backward(dh, dw[:v] if need_dw else None)
        ce_sum, z_sum = ce.sum(), z.sum()
        n_tokens = (targets != ignore_index).sum()
        ctx.mark_non_differentiable(ce_sum, z_sum, n_tokens)
        return ce_sum + z_loss * z_sum, ce_sum, z_sum, n_tokens

    @staticmethod
    def backward(ctx, g, *_):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = dh * g.to(dh.dtype)
        if dw is not None:
            dw = dw * g.to(dw.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, softcap: float | None = None, z_loss: float = 0.0,
                         chunk_rows: int | None = None, impl: str = "auto") -> LinearCEResult:
    """Summed CE of `hidden @ weight.T` against `targets` without materialising all logits.

    hidden [N, H] (or [..., H], flattened), weight [V, H], targets [N] long (or [...]).
    Divide `loss_sum` by `n_tokens` for the mean. `impl` chooses the per-chunk CE kernel.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise KernelInputError(f"linear_cross_entropy: weight {tuple(weight.shape)} must be [V, {h}]")
    if targets.shape[0] != n:
        raise KernelInputError(f"linear_cross_entropy: {targets.shape[0]} targets for {n} hidden rows")
    if hidden.dtype != weight.dtype:
        raise KernelInputError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} differ")
    if targets.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"linear_cross_entropy: targets must be int64/int32; got {targets.dtype}")
    v = weight.shape[0]
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if bool(bad.any()):
        raise KernelInputError(f"linear_cross_entropy: target {int(targets[bad][0])} outside [0, {v}) and "
                               f"not ignore_index={ignore_index}")
    if softcap is not None and not softcap > 0:
        raise KernelInputError(f"linear_cross_entropy: softcap={softcap!r}; expected a positive float or None")
    chunk_rows = chunk_rows or default_chunk_rows(n, v)
    path = choose_impl("linear_cross_entropy", impl, hidden, weight)
    return LinearCEResult(*LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap,
                                                    float(z_loss), int(chunk_rows), path))
