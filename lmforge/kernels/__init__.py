"""Triton kernels with their torch references, autograd wrappers and dispatch.

Modules (each op: a readable torch reference = the spec, a Triton kernel, an autograd Function,
and a function that picks the path; see `runtime` for how the path is chosen):
- `flash_attention`: FlashAttention-2 forward/backward (causal, window, GQA, doc masking, softcap);
- `rms_norm`: fused RMSNorm forward/backward;
- `swiglu`: fused silu(a) * b forward/backward (backward recomputes silu);
- `linear_cross_entropy`: chunked fused linear + cross-entropy that never holds (tokens x vocab).

Nothing here imports triton at import time; the `*_triton` modules do, and are loaded on demand.
"""
