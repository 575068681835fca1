"""Weight-only quantization of linear layers by module swap: int8 per channel, int4 per group.

Decode is memory-bound: reading weights dominates. Storing them in 8 (or 4) bits and dequantizing
inside the matmul cuts the bytes moved per token by 2x (4x) against bf16; activations stay in the
model's dtype.

- int8, per output channel, symmetric: scale_o = max_i |W_oi| / 127, q = round(W / scale) in
  [-127, 127]; y = (x @ q^T) * scale (+ bias).
- int4, per group of `group_size` input columns, symmetric: scale_og = max |W_o,g| / 7, q in
  [-8, 7], two values packed per byte (low nibble = even column); dequantized as q * scale.

`quantize_model(model, "int8")` replaces every `Linear` in place (the untied output head too)
except MLA's `kv_b_proj`, whose weight the model reads directly; the embedding (and a head tied to
it) and MoE expert stacks are not `Linear`s and stay as they are. A quantized model computes logits
but not the fused training loss (`fused_loss` reads `lm_head.weight`). `model.quantization` records what was done, so a
server can report it. The fast path on GPU is torch.compile fusing the dequantize into the matmul;
this module holds the readable reference form. It does not calibrate (no GPTQ/AWQ).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers import Linear

SKIP = ("kv_b_proj",)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q int8 [out, in], scale float32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (packed uint8 [out, in/2], scale float32 [out, in/group_size])."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ConfigError(f"int4 group_size = {group_size} must be even and divide the input width {in_f}")
    g = w.float().view(out_f, in_f // group_size, group_size)
    scale = g.abs().amax(dim=-1).clamp_min(1e-12) / 7
    q = torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int16).view(out_f, in_f)
    nib = (q & 0xF).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int8 [out, in] values in [-8, 7]."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(q > 7, q - 16, q)


class Int8Linear(nn.Module):
    def __init__(self, lin: Linear):
        super().__init__()
        self.d_in, self.d_out = lin.d_in, lin.d_out
        q, scale = quantize_int8(lin.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = lin.bias

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.qweight.to(x.dtype).t()) * self.scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, int8 per channel, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    def __init__(self, lin: Linear, group_size: int = 32):
        super().__init__()
        self.d_in, self.d_out, self.group_size = lin.d_in, lin.d_out, group_size
        packed, scale = quantize_int4(lin.weight.detach(), group_size)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = lin.bias

    def dequantize(self) -> torch.Tensor:
        q = unpack_int4(self.qweight).view(self.d_out, -1, self.group_size).to(self.scale.dtype)
        return (q * self.scale[..., None]).view(self.d_out, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dequantize().to(x.dtype).t()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, int4 groups of {self.group_size}, bias={self.bias is not None}"


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 32) -> nn.Module:
    """Swap the model's Linear layers for Int8Linear / Int4Linear in place (see the module docstring)."""
    if mode not in ("int8", "int4"):
        raise ConfigError(f"quantization mode {mode!r} must be 'int8' or 'int4'")
    if getattr(model, "quantization", None):
        raise ConfigError(f"model is already quantized ({model.quantization})")
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear) and child_name not in SKIP:
                new = Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size)
                setattr(module, child_name, new)
                count += 1
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None, "layers": count}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what decoding reads per step, plus the embedding)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
