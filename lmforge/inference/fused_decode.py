"""The decode step of a dense Llama-family model as a few fused Triton kernels per layer (small batch).

    reason = supports(model, cache, rows)     # None when the fused step can run, else why not
    step = FusedDecoder(model, cache)
    logits = step(tokens, positions)          # tokens, positions [M, 1] -> logits [M, V] (fp32)
    ids = step(tokens, positions, greedy=True)  # -> argmax ids [M] (no logits written)

One decode step (one new token per row, row m of the batch = row m of the engine's StaticKVCache,
each at its own position) runs, per layer, four kernels of lmforge/kernels/decode.py instead of
the ~15 of the model's modules: RMSNorm+qkv+RoPE+cache write, attention (split over keys when
that pays, the splits combined in the same kernel; the variant tuned per shape on the GPU),
o-projection+residual, RMSNorm+gate/up+SwiGLU, down+residual; then the final norm + LM head, with
the greedy argmax in the same kernel. The embedding lookup is one `index_select`. The weights are read from the
model's own (packed) parameters at every call, so in-place updates reach the step; captured in a
CUDA graph (the engine's StepGraphs), their addresses are fixed at capture like any compiled step.

Supported: RMSNorm pre-norm blocks, RoPE in every layer (Llama-3 scaling included), MHA/GQA/MQA
without windows, soft-capping or QK-norm, SwiGLU MLPs, no biases, plain (not quantized) packed
projections (`pack_projections`, the engine's default), up to MAX_ROWS rows. Everything else
(MLA, MoE, LayerNorm/GELU, learned positions, int8, larger batches) runs the model as before:
`supports` says why. `impl="torch"` runs the kernels' torch references instead (the spec of the
whole step, used by tests). Prefill is not done here.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.inference.cache import StaticKVCache
from lmforge.model.layers import MLP, Linear, PackedLinears, RMSNorm
from lmforge.model.positions import rope_cos_sin

# Rows decoded together at most: each weight tile is multiplied with every row in turn, so beyond a
# handful of rows the step stops being bandwidth-bound and the library GEMMs win.
MAX_ROWS = 8


def _packed(module: nn.Module, linears: tuple) -> bool:
    p = getattr(module, "packed", None)
    return isinstance(p, PackedLinears) and p.holds(linears)


def supports(model: nn.Module, cache: StaticKVCache, rows: int, max_rows: int = MAX_ROWS) -> str | None:
    """None when FusedDecoder can decode `rows` rows of this model with this cache, else the reason."""
    from lmforge.kernels.runtime import interpreting, triton_import_error

    cfg = model.cfg
    checks = [
        (rows > max_rows, f"batch of {rows} rows > {max_rows} (the fused step is for small batches)"),
        (cfg.mla is not None, "multi-head latent attention"),
        (cfg.moe is not None, "mixture-of-experts layers"),
        (cfg.norm != "rmsnorm" or cfg.norm_placement != "pre" or cfg.parallel_block,
         f"norm {cfg.norm!r} placed {cfg.norm_placement!r}{' (parallel block)' if cfg.parallel_block else ''}"),
        (not (cfg.glu and cfg.activation == "silu"), f"MLP activation {cfg.activation!r}, glu={cfg.glu} (not SwiGLU)"),
        (cfg.bias or cfg.qkv_bias, "linear biases"),
        (cfg.positions != "rope" or cfg.layer_pattern is not None or cfg.window is not None,
         "positions other than RoPE in every global layer (NoPE layers, windows or absolute positions)"),
        (cfg.qk_norm, "QK-norm"),
        (cfg.attn_softcap is not None or cfg.final_softcap is not None, "soft-capping"),
        (cache.has_rings, "ring-buffer cache layers"),
    ]
    for bad, why in checks:
        if bad:
            return why
    for i, b in enumerate(model.blocks):
        a, m = b.attn, b.mlp
        if not isinstance(m, MLP) or not isinstance(b.norm1, RMSNorm) or not isinstance(b.norm2, RMSNorm):
            return f"block {i} is not a dense RMSNorm block"
        if type(a.o) is not Linear or type(m.down) is not Linear:
            return f"block {i} has swapped (e.g. quantized) linears"
        if not _packed(a, (a.q, a.k, a.v)) or not _packed(m, (m.gate, m.up)):
            return f"block {i}: q/k/v or gate/up are not packed (pack_projections)"
    if model.lm_head is not None and type(model.lm_head) is not Linear:
        return "the LM head is swapped (e.g. quantized)"
    weights = [model.tok_emb.weight] + ([model.lm_head.weight] if model.lm_head is not None else [])
    for b in model.blocks:  # the kernels index weights as row-major [out, in]
        weights += [b.attn.packed.weight, b.attn.o.weight, b.mlp.packed.weight, b.mlp.down.weight]
    if not all(t.is_contiguous() for t in weights):
        return "a weight is not contiguous (the kernels read row-major weights)"
    w = model.tok_emb.weight
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights of dtype {w.dtype}"
    if cache.buffers[0][0].dtype != w.dtype:
        return f"cache dtype {cache.buffers[0][0].dtype} differs from the weights' {w.dtype}"
    err = triton_import_error()
    if err:
        return err
    if w.device.type != "cuda" and not interpreting():
        return f"weights on {w.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 for tests)"
    return None


class FusedDecoder:
    """One decode step of `model` over rows 0..M of `cache` (see the module docstring). Work
    buffers for up to `cache.max_batch` rows are allocated once (fixed addresses for CUDA graphs)."""

    def __init__(self, model: nn.Module, cache: StaticKVCache, impl: str = "triton", attn_splits: int | None = None,
                 attn_impl: str | None = None):
        from lmforge.kernels.decode import argmax_scratch, attention_scratch

        cfg = model.cfg
        self.model, self.cache, self.impl, self.attn_splits = model, cache, impl, attn_splits
        self.attn_impl = attn_impl  # "head", "dot", "sum"; None (with attn_splits None): tuned per shape
        w = model.tok_emb.weight
        dev, dt, R = w.device, w.dtype, cache.max_batch
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        # RoPE as tables [max_len, D/2] (fp32), the very values the model computes per position
        self.cos, self.sin = rope_cos_sin(torch.arange(cache.max_len, device=dev), cfg.head_dim, cfg.rope_theta,
                                          torch.float32, cfg.rope_scaling)
        new = lambda *shape: torch.empty(*shape, dtype=dt, device=dev)
        self.x = [new(R, cfg.d_model), new(R, cfg.d_model)]  # residual stream, ping-pong
        self.q, self.y = new(R, cfg.n_heads, cfg.head_dim), new(R, cfg.n_heads * cfg.head_dim)
        self.h = new(R, cfg.d_ff)
        # fp32 logits holding the model dtype's values (the sampler's .float() is then no copy)
        self.logits = torch.empty(R, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.tokens = torch.empty(R, dtype=torch.long, device=dev)  # greedy steps: the argmax only
        self.attn_scratch = attention_scratch(R, cfg.n_heads, cfg.head_dim, dev)
        self.argmax_scratch = argmax_scratch(R, dev)

    def holds(self) -> bool:
        """Whether the model still has the packed layers this step reads (an eager forward drops a
        packing that a `.to()` or a module swap broke; the engine then goes back to the model)."""
        return all(_packed(b.attn, (b.attn.q, b.attn.k, b.attn.v)) and _packed(b.mlp, (b.mlp.gate, b.mlp.up))
                   for b in self.model.blocks)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int | None = None,
                 greedy: bool = False) -> torch.Tensor:
        """tokens, positions [M, 1] (row m of the batch is cache row m) -> logits [M, V] fp32 (the
        model dtype's values; a view of a buffer the next call overwrites), or with `greedy` the
        argmax token of each row [M] int64 (computed in the head kernel, no logits written).
        `length`: slots the attention's key split plans for (default the whole cache; rows always
        attend to exactly their slots 0..position)."""
        from lmforge.kernels import decode as kd

        model, ref = self.model, self.impl == "torch"
        M = tokens.shape[0]
        pos = positions[:, 0]
        x, x2 = self.x[0][:M], self.x[1][:M]
        q, y, h, logits = self.q[:M], self.y[:M], self.h[:M], self.logits[:M]
        torch.index_select(model.tok_emb.weight, 0, tokens[:, 0], out=x)
        length = length or self.cache.max_len
        for block, (kc, vc) in zip(model.blocks, self.cache.buffers):
            a, mlp = block.attn, block.mlp
            n1, n2 = block.norm1, block.norm2
            if ref:
                q.copy_(kd.norm_qkv_rope_ref(x, n1.weight, n1.eps, a.packed.weight, self.cos, self.sin, pos, kc, vc,
                                             self.n_heads))
                y.copy_(kd.decode_attention_ref(q, kc, vc, pos))
                x2.copy_(kd.gemv_residual_ref(y, a.o.weight, x))
                h.copy_(kd.norm_swiglu_ref(x2, n2.weight, n2.eps, mlp.packed.weight))
                x.copy_(kd.gemv_residual_ref(h, mlp.down.weight, x2))
                continue
            kd.norm_qkv_rope(x, n1.weight, n1.eps, a.packed.weight, self.cos, self.sin, pos, kc, vc, self.n_heads, q)
            kd.decode_attention(q, kc, vc, pos, y, length, self.attn_scratch, self.attn_impl, self.attn_splits)
            kd.gemv_residual(y, a.o.weight, x, x2)
            kd.norm_swiglu(x2, n2.weight, n2.eps, mlp.packed.weight, h)
            kd.gemv_residual(h, mlp.down.weight, x2, x)
        head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
        nf = model.norm_f
        if ref:
            logits.copy_(kd.norm_gemv_ref(x, nf.weight, nf.eps, head))
            return logits.argmax(dim=-1) if greedy else logits
        if greedy:
            return kd.norm_gemv(x, nf.weight, nf.eps, head, None, self.tokens[:M], self.argmax_scratch)
        return kd.norm_gemv(x, nf.weight, nf.eps, head, logits)
