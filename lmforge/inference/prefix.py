"""Prefix caching: requests that share a prompt prefix (a system prompt, few-shot examples, the
earlier turns of a chat) reuse the KV of that prefix instead of prefilling it again.

`PrefixCache(cache, n_blocks, block_size)` keeps a pool of `n_blocks` blocks of `block_size`
positions per layer tensor, in the engine cache's layout ([n_blocks, Hkv, block_size, D] for
attention keys/values, [n_blocks, block_size, r] for MLA's latent). Block i of a token sequence
is looked up by the key (id of block i-1, tokens of block i): a chain of hits is a cached prefix,
and since attention is causal, the KV of positions < p depends only on tokens < p, so cached
blocks equal what a prefill would compute (up to float round-off from the other batch shape).
Keys hold the tokens themselves, not a digest, so a lookup never confuses two prefixes; block
ids are never reused, so a block whose parent was evicted is unreachable and ages out.

- `match(ids)`: the longest cached chain for a prompt (at most len(ids) - 1 tokens: the last
  prompt token is always computed, its logits give the first reply token); the blocks are
  pinned (refcount + 1) until `release`: the engine holds them while the sequence runs;
- `load(blocks, row)`: copy them into a row of the engine's cache (one gather per layer tensor);
- `store(ids, row)`: after a row holds the KV of `ids` (its prompt after prefill, or prompt and
  reply when it finishes), copy its full blocks that are not cached yet into the pool, taking
  free blocks first, then the least recently used block with refcount 0; a pinned block is
  never evicted (if every block is pinned, the rest is not stored).
A lookup touches a chain from its last block to its first, so parents stay more recent than their
children and leaves are evicted first.

The engine's rows stay contiguous (slot s = position s); blocks are copied in and out, which costs
memory traffic but no compute. Sliding-window ring buffers are not supported (the engine then
allocates full-length rows). This module does not decide when to match or store (engine.py).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.inference.cache import StaticKVCache


@dataclass(eq=False)  # compared by identity
class Block:
    key: tuple  # (parent block id, tokens)
    id: int
    slot: int  # index into the pool
    refs: int = 0


class PrefixCache:
    def __init__(self, cache: StaticKVCache, n_blocks: int, block_size: int = 16):
        if n_blocks < 1 or block_size < 1:
            raise ConfigError(f"prefix cache needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        if cache.has_rings:
            raise ConfigError("prefix caching needs full-length cache rows (StaticKVCache.for_model(ring=False))")
        self.cache, self.block_size, self.n_blocks = cache, block_size, n_blocks
        self.pools = [[torch.zeros(n_blocks, *buf.shape[1:-2], block_size, buf.shape[-1], dtype=buf.dtype,
                                   device=buf.device) for buf in layer] for layer in cache.buffers]
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()  # least recently used first
        self.free = list(range(n_blocks))
        self._ids = itertools.count(1)
        self.query_tokens = self.hit_tokens = 0  # prompt tokens looked up / found cached

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.pools for t in layer)

    def _key(self, parent: int, ids: list[int], i: int) -> tuple:
        bs = self.block_size
        return parent, tuple(ids[i * bs:(i + 1) * bs])

    def match(self, ids: list[int]) -> list[Block]:
        """The longest cached chain of blocks that prefixes ids[:-1], pinned."""
        chain, parent = [], 0
        for i in range((len(ids) - 1) // self.block_size):
            b = self.blocks.get(self._key(parent, ids, i))
            if b is None:
                break
            chain.append(b)
            parent = b.id
        self._touch(chain)
        for b in chain:
            b.refs += 1
        self.query_tokens += len(ids)
        self.hit_tokens += len(chain) * self.block_size
        return chain

    def release(self, chain: list[Block]) -> None:
        for b in chain:
            b.refs -= 1

    def _touch(self, chain: list[Block]) -> None:
        for b in reversed(chain):  # parents end up more recent than their children
            self.blocks.move_to_end(b.key)

    def load(self, chain: list[Block], row: int) -> int:
        """Copy the chain's KV into positions 0.. of `row`; returns the number of positions."""
        if not chain:
            return 0
        n = len(chain) * self.block_size
        idx = torch.tensor([b.slot for b in chain], device=self.pools[0][0].device)
        for layer, pools in zip(self.cache.buffers, self.pools):
            for buf, pool in zip(layer, pools):
                d = pool.dim()  # pool [N, ..., bs, last] -> [..., n*bs, last]
                part = pool[idx].movedim(0, d - 3).flatten(d - 3, d - 2)
                buf[row].narrow(d - 3, 0, n).copy_(part)
        return n

    def store(self, ids: list[int], row: int) -> int:
        """Cache the full blocks of `ids`, whose KV row `row` holds; returns blocks added."""
        bs = self.block_size
        chain, parent, new = [], 0, []
        for i in range(len(ids) // bs):
            key = self._key(parent, ids, i)
            b = self.blocks.get(key)
            if b is None:  # this block and all after it are new (their parents are new)
                slot = self._take_slot(chain + new)
                if slot is None:
                    break
                b = Block(key, next(self._ids), slot)
                self.blocks[key] = b
                new.append(b)
            else:
                chain.append(b)
            parent = b.id
        self._touch(chain + new)
        if new:
            i0 = len(chain)
            idx = torch.tensor([b.slot for b in new], device=self.pools[0][0].device)
            for layer, pools in zip(self.cache.buffers, self.pools):
                for buf, pool in zip(layer, pools):
                    d = pool.dim()
                    part = buf[row].narrow(d - 3, i0 * bs, len(new) * bs)  # [..., m*bs, last]
                    pool[idx] = part.unflatten(d - 3, (len(new), bs)).movedim(d - 3, 0)
        return len(new)

    def _take_slot(self, keep: list[Block]) -> int | None:
        if self.free:
            return self.free.pop()
        keep_ids = {b.id for b in keep}
        for key, b in self.blocks.items():  # least recently used first
            if b.refs == 0 and b.id not in keep_ids:
                del self.blocks[key]
                return b.slot
        return None
