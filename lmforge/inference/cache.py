"""Preallocated KV cache for the inference engine: fixed buffers, one row per sequence slot.

`StaticKVCache.for_model(model, max_batch, max_len)` allocates, per layer, the tensors that layer's
attention caches: keys and values [max_batch, Hkv, max_len, D] for (GQA/MQA) attention, the latent
[max_batch, max_len, r] and shared rope key [max_batch, max_len, rope] for multi-head latent
attention. Key slot s of a row always holds position s, so:
- rows can have different lengths: attention masks keys by each row's query positions
  (`attend(query_positions=...)`), so stale or empty slots beyond a row's position are never read;
- rolling back (speculative decoding) or reusing a row is free: the engine just forgets positions;
- sliding-window layers keep a ring buffer of `window + slack` slots instead (`ring=True`, the
  default): position p goes to slot p mod R, and a key-position table [max_batch, R] (-1 = empty)
  tells attention which position each slot holds (`attend(key_positions=...)`). A call attends to
  the old ring plus its new tokens, then writes its last min(T, R) tokens into the ring. The
  `slack` (> tokens per call beyond one, e.g. speculative drafts) guarantees that writes which are
  later rolled back only overwrite positions already outside every future query's window.

`cache.view(rows, length, positions)` is what the model gets as `kv_cache`: it writes the call's
new tensors at `positions` [b, T] into rows `rows` (a slice: views, never copies) and hands the
attention the first `length` slots (ring layers: the ring plus the new tokens). `rows` may also be
a 1-D tensor of row ids in any order (full-length layers only): the writes go to those rows and
the attention gets a gathered copy of their first `length` slots, so prompts admitted into
scattered free slots are prefilled in one forward. It follows the model's cache contract
(`layer(i).update(*tensors)`, `length`) plus `keys_at_positions = True` and `attention_mask(positions,
S, window)`: the mask of the call's positions, built once per forward for the layers that share it.

This module does not decide which rows are free or what positions are; the engine does.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.attention import attention_mask


def _ring_size(block: nn.Module, max_len: int, ring: bool, slack: int) -> int | None:
    window = getattr(block.attn, "window", None)
    if ring and window is not None and window + slack < max_len:
        return window + slack
    return None


def _layer_shapes(block: nn.Module, max_batch: int, max_len: int) -> list[tuple[int, ...]]:
    attn = block.attn
    if hasattr(attn, "n_kv_heads"):  # model/attention.py Attention
        shape = (max_batch, attn.n_kv_heads, max_len, attn.head_dim)
        return [shape, shape]
    if hasattr(attn, "cfg") and hasattr(attn.cfg, "kv_lora_rank"):  # model/mla.py
        return [(max_batch, max_len, attn.cfg.kv_lora_rank), (max_batch, max_len, attn.cfg.qk_rope_head_dim)]
    raise ConfigError(f"no preallocated cache layout for attention module {type(attn).__name__}")


class StaticKVCache:
    """Fixed per-layer buffers [max_batch, ..., max_len, ...] (sequence on dim -2)."""

    def __init__(self, buffers: list[list[torch.Tensor]], max_len: int,
                 key_positions: list[torch.Tensor | None] | None = None, slack: int = 0):
        self.buffers = buffers
        self.max_batch = buffers[0][0].shape[0]
        self.max_len = max_len
        self.key_positions = key_positions or [None] * len(buffers)  # ring layers: [max_batch, R]
        self.slack = slack

    @property
    def has_rings(self) -> bool:
        return any(kp is not None for kp in self.key_positions)

    @classmethod
    def for_model(cls, model: nn.Module, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, ring: bool = True, slack: int = 16) -> StaticKVCache:
        if max_batch < 1 or max_len < 1:
            raise ConfigError(f"cache needs max_batch >= 1 and max_len >= 1, got {max_batch}, {max_len}")
        ctx = model.cfg.context_length
        if model.cfg.positions == "learned" and max_len > ctx:
            raise ConfigError(f"cache max_len = {max_len} exceeds the learned position table ({ctx})")
        p = next(model.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        buffers, key_positions = [], []
        for b in model.blocks:
            R = _ring_size(b, max_len, ring, slack)
            buffers.append([torch.zeros(s, dtype=dtype, device=device)
                            for s in _layer_shapes(b, max_batch, R or max_len)])
            key_positions.append(None if R is None else
                                 torch.full((max_batch, R), -1, dtype=torch.long, device=device))
        return cls(buffers, max_len, key_positions, slack)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.buffers for t in layer)

    def view(self, rows: slice | torch.Tensor, length: int, positions: torch.Tensor) -> CacheView:
        """The cache as the model sees it for one forward over `rows` (new tokens at `positions`);
        rows: a slice, or a 1-D tensor of row ids (no ring layers: a gathered ring could not be
        written back)."""
        if not 0 < length <= self.max_len:
            raise ConfigError(f"cache view length {length} is outside [1, {self.max_len}]")
        if isinstance(rows, torch.Tensor) and self.has_rings:
            raise ConfigError("a cache with sliding-window rings takes rows as a slice, not a tensor of row ids")
        return CacheView(self, rows, length, positions)

    def copy_rows(self, src: int, dsts: list[int], length: int) -> None:
        """Copy the first `length` slots of row `src` to rows `dsts` (n samples sharing one prefill)."""
        for layer, kp in zip(self.buffers, self.key_positions):
            for buf in layer:
                seq = buf.dim() - 2
                n = length if kp is None else buf.shape[seq]  # a ring is copied whole
                part = buf[src].narrow(seq - 1, 0, n)
                for d in dsts:
                    buf[d].narrow(seq - 1, 0, n).copy_(part)
            for d in dsts if kp is not None else ():
                kp[d].copy_(kp[src])


class _LayerView:
    keys_at_positions = True

    def __init__(self, bufs: list[torch.Tensor], view: CacheView, ring_positions: torch.Tensor | None):
        self.bufs, self.view, self.ring_positions = bufs, view, ring_positions
        self.key_positions = None  # set by a ring layer's update: positions of the returned keys

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(new) != len(self.bufs):
            raise ValueError(f"cache layer holds {len(self.bufs)} tensors, update gave {len(new)}")
        if self.ring_positions is not None:
            return self._update_ring(new)
        rows, pos, length = self.view.rows, self.view.positions, self.view.length
        out = []
        for buf, t in zip(self.bufs, new):
            # buf[row, ..., pos[b, t], :] = new[b, ..., t, :] as one index_put_ on the whole buffer:
            # under torch.compile it stays one in-place write of the new entries (a scatter into a
            # row view was functionalised into a copy of the whole buffer, twice per layer)
            seq = t.dim() - 2
            index = [self.view.row_ids] + [None] * (seq - 1) + [pos]  # None: every head
            # advanced indices come first in the written shape: [B, T, ...]
            torch.ops.aten.index_put_(buf, index, t.movedim(seq, 1).to(buf.dtype))
            if isinstance(rows, slice):
                out.append(buf[rows].narrow(seq, 0, length))
            else:  # scattered rows: a copy of their first `length` slots
                out.append(buf.narrow(seq, 0, length).index_select(0, rows))
        return tuple(out)

    def _update_ring(self, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        rows, pos = self.view.rows, self.view.positions
        kp = self.ring_positions[rows]  # [b, R], a view
        B, T = pos.shape
        R = kp.shape[1]
        # the old ring, then this call's tokens; old entries at or after the first new position are
        # stale (a rolled-back draft, or an earlier sequence in this row) and are masked
        stale = kp >= pos[:, :1]
        self.key_positions = torch.cat((kp.masked_fill(stale, -1), pos), dim=1)
        n = min(T, R)  # only the last R tokens can be kept
        tail_pos = pos[:, T - n:]
        slots = tail_pos % R
        out = []
        for buf, t in zip(self.bufs, new):
            part = buf[rows]
            seq = t.dim() - 2
            out.append(torch.cat((part, t.to(part.dtype)), dim=seq))
            idx = slots.view(B, *([1] * (t.dim() - 3)), n, 1).expand(*t.shape[:seq], n, t.shape[-1])
            part.scatter_(seq, idx, t.narrow(seq, T - n, n).to(part.dtype))
        kp.scatter_(1, slots, tail_pos)
        return tuple(out)

    def attention_mask(self, positions: torch.Tensor, S: int, window: int | None) -> torch.Tensor | None:
        """The mask attention would build for queries at `positions` over S key slots, built once
        per forward and shared by the layers with the same window (inductor does not merge the
        per-layer copies); None for ring layers (their key positions are their own) and for
        positions other than the ones this call writes at."""
        if self.ring_positions is not None or positions is not self.view.positions:
            return None
        return self.view.attention_mask(S, window)

    @property
    def length(self) -> int:
        return self.view.length


class CacheView:
    """Rows `rows` (a slice or row ids) of a StaticKVCache, `length` slots visible, new tokens written at `positions`."""

    keys_at_positions = True

    def __init__(self, cache: StaticKVCache, rows: slice | torch.Tensor, length: int, positions: torch.Tensor):
        self.rows, self.length, self.positions = rows, length, positions
        self.row_ids = (rows[:, None] if isinstance(rows, torch.Tensor) else  # [b, 1]
                        torch.arange(rows.start, rows.stop, device=positions.device)[:, None])
        self.layers = [_LayerView(bufs, self, kp) for bufs, kp in zip(cache.buffers, cache.key_positions)]
        self.masks: dict[int | None, torch.Tensor] = {}  # by window

    def attention_mask(self, S: int, window: int | None) -> torch.Tensor | None:
        # keyed by window only: every full-length layer attends to the same S = `length` slots, and
        # S may be symbolic in a dynamic-shape compile (not hashable)
        if window not in self.masks:
            self.masks[window] = attention_mask(self.positions.shape[1], S, causal=True, window=window,
                                                doc_ids=None, device=self.positions.device,
                                                query_positions=self.positions)
        return self.masks[window]

    def layer(self, i: int) -> _LayerView:
        return self.layers[i]
