"""`ModelConfig`: every architecture choice of the Transformer family, as one typed dataclass.

Derived fields (`n_kv_heads`, `head_dim`, `d_ff`, `qkv_bias`) default to None and are filled by
`__post_init__` only when unset, following the field's rule (d_ff = 8/3·d_model rounded up to a
multiple of 64 for GLU MLPs, 4·d_model otherwise; head_dim = d_model / n_heads). A value that
contradicts another field raises ConfigError naming both. Named presets live in `presets.py`.

The config only describes shapes and switches; it builds nothing (see `transformer.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import ConfigError

# MoE and MLA live in their own modules (model/moe.py, model/mla.py); their configs nest here.
from lmforge.model.mla import MLAConfig
from lmforge.model.moe import MoEConfig
from lmforge.model.positions import RopeScaling

Norm = Literal["rmsnorm", "layernorm"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2"]
Positions = Literal["rope", "learned", "sinusoidal", "none"]
Backend = Literal["auto", "reference", "sdpa", "triton"]
# Kinds of attention layer in `layer_pattern` (repeated cyclically over the layers):
# "global" attends to all earlier tokens, "local" to the last `window` tokens; the "-nope" variants
# skip RoPE in that layer (e.g. Llama-4 / Command-A style "3 local RoPE layers then 1 global NoPE").
LAYER_KINDS = ("global", "local", "global-nope", "local-nope")


def _round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


@dataclass
class ModelConfig:
    # shapes
    vocab_size: int = 8192
    context_length: int = 1024
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    head_dim: int | None = None  # None -> d_model // n_heads
    d_ff: int | None = None  # None -> 8/3·d_model rounded up to 64 (GLU) or 4·d_model
    # block structure
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm bias (RMSNorm has none)
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"  # sandwich: pre + post norm per branch
    parallel_block: bool = False  # GPT-J/PaLM: x + attn(norm(x)) + mlp(norm(x))
    activation: Activation = "silu"
    glu: bool = True  # gated MLP: silu+glu = SwiGLU, gelu+glu = GeGLU
    bias: bool = False  # biases in every Linear (GPT-2 style)
    qkv_bias: bool | None = None  # None -> bias; Qwen2 has q/k/v biases only
    # positions
    positions: Positions = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama-3.1 long-context frequency scaling
    # attention
    attention_backend: Backend = "auto"  # auto: SDPA, or the Triton kernel for masks on GPU
    window: int | None = None  # sliding-window size of "local" layers (attends to the last `window` tokens)
    layer_pattern: list[str] | None = None  # None: all "global", or all "local" when window is set
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    attn_softcap: float | None = None  # cap·tanh(scores/cap) on attention logits (Gemma 2)
    final_softcap: float | None = None  # the same on output logits
    # loss
    z_loss: float = 0.0  # coefficient of mean(log Z²) over target tokens (PaLM uses 1e-4)
    fused_loss: bool = False  # chunked linear+CE kernel: no [B, T, V] logits when targets are given
    fused_ops: bool = False  # RMSNorm and SwiGLU through lmforge.kernels (Triton on CUDA)
    # embeddings / regularisation / init
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    # mixture of experts and latent attention (DeepSeek)
    moe: MoEConfig | None = None
    n_dense_layers: int = 0  # with moe: the first n layers keep a dense MLP (DeepSeek-V3: 3)
    mla: MLAConfig | None = None
    # multi-token prediction (DeepSeek-V3): depth-k modules predicting token i+k+1
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise bad(f"{name} = {getattr(self, name)} must be >= 1")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise bad(f"n_heads = {self.n_heads} must be a multiple of n_kv_heads = {self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise bad(f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}; "
                          "set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise bad(f"head_dim = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.d_ff is None:
            self.d_ff = _round_up(8 * self.d_model / 3, 64) if self.glu else 4 * self.d_model
        if self.d_ff < 1:
            raise bad(f"d_ff = {self.d_ff} must be >= 1")
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.qkv_bias and not self.bias and self.mla is not None:
            raise bad("qkv_bias = true conflicts with mla (MLA has no q/k/v projections)")
        if self.norm == "rmsnorm" and self.norm_bias:
            raise bad("norm_bias = true conflicts with norm = 'rmsnorm' (RMSNorm has no bias)")
        if self.window is not None and self.window < 1:
            raise bad(f"window = {self.window} must be >= 1")
        if self.layer_pattern is not None:
            if not self.layer_pattern:
                raise bad("layer_pattern is empty; leave it out for all-global layers")
            for kind in self.layer_pattern:
                if kind not in LAYER_KINDS:
                    raise bad(f"layer_pattern entry {kind!r} must be one of {list(LAYER_KINDS)}")
            if any(k.startswith("local") for k in self.layer_pattern) and self.window is None:
                raise bad(f"layer_pattern {self.layer_pattern} has local layers but window is not set")
            if any(k.endswith("-nope") for k in self.layer_pattern) and self.positions != "rope":
                raise bad(f"layer_pattern '-nope' layers need positions = 'rope', got {self.positions!r}")
        for name in ("attn_softcap", "final_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise bad(f"{name} = {getattr(self, name)} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad(f"dropout = {self.dropout} must be in [0, 1)")
        if self.z_loss < 0:
            raise bad(f"z_loss = {self.z_loss} must be >= 0")
        if self.mtp_depth < 0:
            raise bad(f"mtp_depth = {self.mtp_depth} must be >= 0")
        if self.n_dense_layers and self.moe is None:
            raise bad(f"n_dense_layers = {self.n_dense_layers} only applies with moe set")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise bad(f"n_dense_layers = {self.n_dense_layers} must be in [0, n_layers = {self.n_layers}]")
        if self.mla is not None and self.attn_softcap is not None:
            raise bad("attn_softcap conflicts with mla (not supported together)")
        if self.rope_scaling is not None and (self.positions != "rope" or self.mla is not None):
            raise bad(f"rope_scaling needs positions = 'rope' without mla (positions = {self.positions!r}, "
                      f"mla {'set' if self.mla is not None else 'unset'})")
        if self.mla is not None and self.qk_norm:
            raise bad("qk_norm = true conflicts with mla (MLA normalises its latents instead)")
        if self.parallel_block and self.norm_placement == "sandwich":
            raise bad("parallel_block = true conflicts with norm_placement = 'sandwich'")

    # -- per-layer structure, used by the model and by accounting alike --
    def layer_kind(self, layer: int) -> str:
        """'global', 'local', 'global-nope' or 'local-nope' for layer `layer` (0-based)."""
        if self.layer_pattern is None:
            return "global" if self.window is None else "local"
        return self.layer_pattern[layer % len(self.layer_pattern)]

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.layer_kind(layer).startswith("local") else None

    def layer_uses_rope(self, layer: int) -> bool:
        return self.positions == "rope" and not self.layer_kind(layer).endswith("-nope")

    def layer_is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.n_dense_layers

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed. Derived fields keep their resolved values unless given
        (pass e.g. head_dim=None together with a new d_model to derive it again)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(changes)
        return ModelConfig(**data)
