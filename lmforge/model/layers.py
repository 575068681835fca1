"""Building blocks written from tensor ops: the readable reference the rest of the model uses.

Linear and Embedding (weights created empty; `init_weights` in transformer.py fills them with a
truncated normal), RMSNorm and LayerNorm (statistics in float32), activations (SiLU, GELU exact and
tanh, ReLU, ReLU²), the MLP (plain or gated: SwiGLU/GeGLU), a numerically stable softmax,
cross-entropy from logits, and dropout.

Where torch has a fused equivalent (F.cross_entropy) we keep our version as the spec and use the
fused one as the fast path; tests check that they agree. Linear and LayerNorm compute through
F.linear / F.layer_norm (tests compare them with the written-out formulas): under autocast and
torch.compile these keep 16-bit outputs and give the compiler the ops' own backward. Nothing here knows about attention or
about the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for 16-bit inputs (numerically sensitive reductions), float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std²) truncated at ±3 std: no rare huge initial weights."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Module):
    """y = x Wᵀ (+ b), W of shape [out, in] (the torch/HF layout, so state dicts map 1:1)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def reset_parameters(self, std: float) -> None:
        trunc_normal_(self.weight, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear is x @ W.t() + b in one op. Under autocast it also casts the bias to the compute
        # dtype, so the output stays 16-bit: `x @ W.t() + b` would promote it to float32 and
        # double the bytes every following elementwise kernel (and saved activation) moves.
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """A lookup table: ids [...] -> rows of weight [num, dim]."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.num, self.dim = num, dim
        self.weight = nn.Parameter(torch.empty(num, dim))

    def reset_parameters(self, std: float) -> None:
        trunc_normal_(self.weight, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g, computed in float32 and cast back (Llama/HF convention).

    `fused = "auto"` (or "triton" / "torch", the kernels' `impl`) runs lmforge.kernels.rms_norm
    instead: Triton on CUDA, its torch reference elsewhere; it applies g before the cast back,
    which differs only in 16-bit rounding."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.fused: str | None = None
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self, std: float = 0.0) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from lmforge.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, impl=self.fused)
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) · g (+ b), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def reset_parameters(self, std: float = 0.0) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / sqrt(var + eps) through F.layer_norm (no affine): the same float32 numbers
        # as writing it out, but the compiler gets layer norm's own backward formula.
        y = F.layer_norm(upcast(x), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ConfigError(f"norm = {kind!r} must be 'rmsnorm' or 'layernorm'")


# -- activations --------------------------------------------------------------------------------

def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: x·Φ(x)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation GPT-2 (and Gemma) use."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Primer; modded-nanogpt)."""
    return x.clamp_min(0).square()


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu, "relu2": relu2}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"activation = {name!r} must be one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Position-wise feed-forward: down(act(up(x))), or gated down(act(gate(x)) * up(x)).

    Parameter names `gate`, `up`, `down` are an API: MoE upcycling and HF interop map them.
    `fused = "auto"` (or a kernels `impl`) computes silu(gate)·up with lmforge.kernels.swiglu
    (SwiGLU only).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", glu: bool = True,
                 bias: bool = False):
        super().__init__()
        self.fused: str | None = None
        self.swiglu = glu and activation == "silu"
        self.act = get_activation(activation)
        self.gate = Linear(d_model, d_ff, bias) if glu else None
        self.up = Linear(d_model, d_ff, bias)
        self.down = Linear(d_ff, d_model, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.swiglu:
            from lmforge.kernels.swiglu import swiglu

            return self.down(swiglu(self.gate(x), self.up(x), impl=self.fused))
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


# -- softmax, cross-entropy, dropout -------------------------------------------------------------

def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum: subtracting the max keeps exp from overflowing. Rows that are all -inf
    (fully masked) give zeros instead of NaN."""
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = x.amax(dim, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  fast: bool = True) -> torch.Tensor:
    """Per-token CE = logsumexp(logits) - logits[target], in float32; 0 where target == ignore_index.

    logits [..., V], targets [...] -> losses [...]. `fast=False` is the written-out reference.
    """
    logits = upcast(logits)
    if fast:
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index, reduction="none")
        return flat.view(targets.shape)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logsumexp(logits) - picked, torch.zeros_like(picked))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap·tanh(x/cap): smooth clamp of logits to (-cap, cap) (Gemma 2)."""
    return x if cap is None else cap * torch.tanh(x / cap)
