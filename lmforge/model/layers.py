"""Building blocks written from tensor ops: the readable reference the rest of the model uses.

Linear and Embedding (weights created empty; `init_weights` in transformer.py fills them with a
truncated normal), RMSNorm and LayerNorm (statistics in float32), activations (SiLU, GELU exact and
tanh, ReLU, ReLU²), the MLP (plain or gated: SwiGLU/GeGLU), a numerically stable softmax,
cross-entropy from logits, and dropout. `PackedLinears` stores the weights of Linears that read the
same input (attention's q/k/v, the MLP's gate/up) as row blocks of one buffer, so that one GEMM
computes them all (`pack()` on Attention and MLP, `pack_projections(model)` in transformer.py).

Where torch has a fused equivalent (F.cross_entropy) we keep our version as the spec and use the
fused one as the fast path; tests check that they agree. Linear and LayerNorm compute through
F.linear / F.layer_norm (tests compare them with the written-out formulas): under autocast and
torch.compile these keep 16-bit outputs and give the compiler the ops' own backward. Nothing here knows about attention or
about the whole model.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

log = logging.getLogger(__name__)


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


class _Rows(torch.autograd.Function):
    """The packed buffer itself (a view, no copy), differentiable with respect to the parameters that
    are its consecutive row blocks: the buffer's gradient is split into theirs."""

    @staticmethod
    def forward(ctx, packed, *parts):
        ctx.sizes = [p.shape[0] for p in parts]
        return packed.view_as(packed)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.split(ctx.sizes))


class PackedLinears:
    """Linears that read the same input, re-allocated as consecutive row blocks of one buffer.

    Each Linear's weight (and bias) Parameter keeps its object, name and shape; only its data
    becomes a view of the shared buffer (`param.data = buffer[rows]`). State dicts, optimizers and
    in-place updates (optimizer steps, `load_state_dict`) therefore see the same parameters, and
    `self(x)` computes every Linear's output with one F.linear over the buffer (with gradients, the
    buffer's gradient is split into the parameters'): one GEMM instead of one per Linear.

    The packing ends when a parameter stops being such a view (`.to()` to another device or dtype,
    `load_state_dict(assign=True)`, `.data = ...`, a copy) or a Linear is swapped for another module
    (quantized, tensor-parallel, adapters): `holds` then says False and the owner goes back to
    separate Linears. A deep copy of a packed module is not packed (its parameters are clones).
    Known limits: compiled code checks only identity, dtype and device, so a same-shaped
    `param.data = other` swap under torch.compile keeps running the old buffer (re-pack after such
    a swap); autograd's version counter guards the buffer, not each parameter, so an in-place edit
    of a packed weight between forward and backward is not detected; after `.to()` the old buffers
    stay alive until the layer's next eager forward drops them.
    """

    def __init__(self, linears: tuple[Linear, ...]):
        self.weights = tuple(lin.weight for lin in linears)
        self.biases = tuple(lin.bias for lin in linears)
        self.sizes = [w.shape[0] for w in self.weights]
        # inference_mode(False): packing inside an inference-mode region (an engine built there)
        # must not turn the parameters into inference tensors that training can no longer use
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([w.detach() for w in self.weights])
            self.bias = None if self.biases[0] is None else torch.cat([b.detach() for b in self.biases])
            row = 0
            for w, b, n in zip(self.weights, self.biases, self.sizes):
                w.data = self.weight[row:row + n]
                if b is not None:
                    b.data = self.bias[row:row + n]
                row += n
        # what `holds` compares: each parameter's address and shape inside the buffers
        self.params = [p for p in self.weights + self.biases if p is not None]
        self.layout = [(p.data_ptr(), p.shape) for p in self.params]

    @classmethod
    def pack(cls, *linears, current: PackedLinears | None = None) -> PackedLinears | None:
        """Pack plain Linears with the same input width, dtype and device, all with or all without
        biases; None (nothing changed) otherwise, or on the meta device. A `current` packing that
        still holds is kept: re-allocating would leave compiled code and captured CUDA graphs that
        read the old buffer (another engine on the same model) with dangling addresses."""
        if current is not None and not torch.compiler.is_compiling() and current.holds(linears):
            return current
        ws = [getattr(lin, "weight", None) for lin in linears]
        if any(type(lin) is not Linear for lin in linears) or ws[0].device.type == "meta":
            return None
        if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1:
            return None
        biases = [lin.bias is not None for lin in linears]
        if any(biases) and not all(biases):
            return None
        return cls(tuple(linears))

    def __deepcopy__(self, memo):
        return None  # the copy's parameters are separate clones (Parameter.__deepcopy__)

    def holds(self, linears) -> bool:
        """Whether `linears` are still the packed modules with views of the buffer as parameters.
        Inside torch.compile only identity, dtype and device are checked (dynamo cannot read data
        pointers); eager calls check the addresses too, and their owner unpacks on a mismatch."""
        for lin, w, b in zip(linears, self.weights, self.biases):
            if type(lin) is not Linear or lin.weight is not w or lin.bias is not b:
                return False
            if w.dtype != self.weight.dtype or w.device != self.weight.device:
                return False
        if torch.compiler.is_compiling():
            return True
        # the buffers are alive (held here), so no other tensor on this device can have these addresses
        return all(p.data_ptr() == ptr and p.shape == shape for p, (ptr, shape) in zip(self.params, self.layout))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, b = self.weight, self.bias
        if torch.is_grad_enabled():
            w = _Rows.apply(w, *self.weights)
            b = None if b is None else _Rows.apply(b, *self.biases)
        return F.linear(x, w, b).split(self.sizes, dim=-1)


_warned_unpacked = False


def run_packed(module: nn.Module, linears: tuple, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `linears` on x with one GEMM through `module.packed`, or None when the module
    is not packed (any more: in eager mode a broken packing is dropped, logged once)."""
    global _warned_unpacked
    packed = module.packed
    if packed is None:
        return None
    if packed.holds(linears):
        return packed(x)
    if not torch.compiler.is_compiling():
        module.packed = None
        if not _warned_unpacked:
            _warned_unpacked = True
            log.warning("%s: packed projections were replaced or moved (e.g. .to(), a module swap); they "
                        "run as separate GEMMs now (call pack_projections(model) again to re-pack)",
                        type(module).__name__)
    return None


def cat_linears(linears: tuple, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """With gradients on and plain Linears (not quantized or otherwise swapped), their outputs
    through one GEMM over the concatenated weights (None otherwise): the backward then has one
    input-gradient GEMM instead of one per Linear plus the adds; the same numbers as a packed
    module's GEMM. Without gradients (decoding) the concatenation would copy the weights per token."""
    if not torch.is_grad_enabled() or any(type(lin) is not Linear for lin in linears):
        return None
    if len({lin.bias is None for lin in linears}) != 1:
        return None
    w = torch.cat([lin.weight for lin in linears])
    b = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return F.linear(x, w, b).split([lin.weight.shape[0] for lin in linears], dim=-1)


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
    (SwiGLU only). `pack()` puts gate and up into one buffer, computed by one GEMM.
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
        self.packed: PackedLinears | None = None  # pack(): gate and up in one buffer

    def pack(self) -> bool:
        """Store gate and up as one buffer (PackedLinears): one GEMM computes both. Idempotent."""
        if self.gate is not None:
            self.packed = PackedLinears.pack(self.gate, self.up, current=self.packed)
        return self.packed is not None

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate(x), up(x): one GEMM when packed, or when training with plain Linears (cat_linears;
        not with the fused SwiGLU kernel, which would copy the two non-contiguous halves)."""
        pair = (self.gate, self.up)
        out = run_packed(self, pair, x)
        if out is None and not self.fused:
            out = cat_linears(pair, x)
        return out if out is not None else (self.gate(x), self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        g, u = self.gate_up(x)
        if self.fused and self.swiglu:
            from lmforge.kernels.swiglu import swiglu

            return self.down(swiglu(g, u, impl=self.fused))
        return self.down(self.act(g) * u)


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
