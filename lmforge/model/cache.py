"""A simple growing KV cache for incremental decoding (the model's side of the cache contract).

`KVCache(n_layers)` holds one `LayerCache` per layer. An attention layer calls
`cache.update(*tensors)`, which appends the new tensors along the sequence dimension (-2) and
returns the full ones: (k, v) for standard attention ([B, H, S, D]), or whatever an attention kind
needs to keep (the MLA layer keeps its latent [B, S, r] and rope key). `Transformer.forward` reads
`kv_cache.length` to continue positions.

This is the correctness reference. A fixed-size, preallocated cache for compiled decoding and
batched serving belongs to inference/ and only has to offer the same `layer(i).update(...)` and
`length`.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Tensors of one layer, concatenated along dim -2 as tokens arrive."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tensors is None:
            self.tensors = tuple(new)
        else:
            if len(new) != len(self.tensors):
                raise ValueError(f"cache holds {len(self.tensors)} tensors, update gave {len(new)}")
            self.tensors = tuple(torch.cat((old, t), dim=-2) for old, t in zip(self.tensors, new))
        return self.tensors

    @property
    def length(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[-2]


class KVCache:
    """Per-layer caches for one batch of sequences that all have the same cached length."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reset(self) -> None:
        for layer in self.layers:
            layer.tensors = None
