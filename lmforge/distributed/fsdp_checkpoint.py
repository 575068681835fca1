"""Sharded checkpoints of FSDP2 runs: every rank writes its own rows; any rank count reads them back.

FSDP2 shards each parameter (and its optimizer state) on dim 0 with `torch.chunk` over the world:
rank r of W holds rows [r*c, min((r+1)*c, n)) with c = ceil(n / W) (possibly none). Each rank writes
`model.rank-R-of-W.safetensors` (its rows of every parameter; rank 0 also the replicated buffers) and
`optimizer.rank-R-of-W.safetensors` (its rows of every state tensor, keyed "index.name" under the
global parameter indices, as in the unsharded format). Nothing is gathered, so no rank ever holds
the full model. Loading computes the rows this rank needs now (its FSDP chunk for the current world
size, or all rows for an unsharded model) and reads only the overlapping slices from the files that
hold them (`safe_open(...).get_slice`), so the run resumes on any number of ranks, including one
process without FSDP. The full shapes are recorded in trainer.json (`distributed.shapes`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import CheckpointError


def row_range(n_rows: int, world: int, rank: int) -> tuple[int, int]:
    """FSDP2's dim-0 chunk of rank `rank` (torch.chunk rule)."""
    c = -(-n_rows // world) if n_rows else 0
    start = min(rank * c, n_rows)
    return start, min(start + c, n_rows)


def _file(path: Path, kind: str, rank: int, world: int) -> Path:
    return path / f"{kind}.rank-{rank:05d}-of-{world:05d}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def write_shards(tmp: Path, trainer, parallel) -> tuple[dict, dict]:
    """This rank's files; returns (shapes by key for 'model' and 'optimizer', optimizer JSON rest)."""
    from safetensors.torch import save_file

    from lmforge.train.checkpoint import split_optimizer_state

    rank, world = parallel.rank, parallel.world_size
    model_t, shapes = {}, {"model": {}, "optimizer": {}}
    for key, value in trainer.model.state_dict().items():
        shapes["model"][key] = list(value.shape)
        if hasattr(value, "to_local"):
            local = value.to_local()
            start, end = row_range(value.shape[0], world, rank)
            if local.shape[0] != end - start:
                raise CheckpointError(f"FSDP shard of {key} has {local.shape[0]} rows on rank {rank}, expected "
                                      f"{end - start} (torch.chunk rule); cannot write a sharded checkpoint")
            model_t[key] = local
        elif rank == 0:
            model_t[key] = value
    save_file({k: v.detach().contiguous().cpu() for k, v in model_t.items()}, str(_file(tmp, "model", rank, world)))
    tensors, rest = split_optimizer_state(trainer.optimizer.state_dict())
    shapes["optimizer"] = {k: list(v.shape) for k, v in tensors.items()}
    save_file({k: _local(v).detach().contiguous().cpu() for k, v in tensors.items()},
              str(_file(tmp, "optimizer", rank, world)))
    return shapes, rest


def _read_rows(path: Path, kind: str, key: str, shape: list[int], saved_world: int, start: int, end: int,
               replicated: bool) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        if replicated:
            with safe_open(str(_file(path, kind, 0, saved_world)), framework="pt") as f:
                return f.get_tensor(key)
        pieces = []
        for r in range(saved_world):
            s, e = row_range(shape[0], saved_world, r)
            a, b = max(s, start), min(e, end)
            if a >= b:
                continue
            with safe_open(str(_file(path, kind, r, saved_world)), framework="pt") as f:
                pieces.append(f.get_slice(key)[a - s:b - s])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: sharded {kind} state is unreadable: {e}") from None
    if not pieces:
        return torch.empty((0, *shape[1:]))
    return torch.cat(pieces)


def _rows_for(target: torch.Tensor, shape: list[int], parallel) -> tuple[int, int]:
    if hasattr(target, "to_local"):
        return row_range(shape[0], parallel.world_size, parallel.rank)
    return 0, shape[0] if shape else 0


@torch.no_grad()
def load_shards(path: Path, meta: dict, trainer, parallel, wanted: set[int] | None) -> dict:
    """Load this rank's part of the model now; return the optimizer state dict (index form) with
    tensors shaped like the current parameters' shards (DTensors under FSDP)."""
    from lmforge.train.checkpoint import join_optimizer_state

    shapes, saved_world = meta["distributed"]["shapes"], meta["distributed"]["world_size"]
    sharded = set(meta["distributed"]["sharded"])
    current = trainer.model.state_dict()
    if set(current) != set(shapes["model"]):
        raise CheckpointError(f"{path} does not fit this model: keys differ "
                              f"({sorted(set(current) ^ set(shapes['model']))[:5]})")
    for key, target in current.items():
        if list(target.shape) != shapes["model"][key]:
            raise CheckpointError(f"{path}: {key} has shape {shapes['model'][key]} there, {list(target.shape)} here")
        start, end = _rows_for(target, shapes["model"][key], parallel)
        rows = _read_rows(path, "model", key, shapes["model"][key], saved_world, start, end, key not in sharded)
        _local(target).copy_(rows)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    tensors = {}
    for key, shape in shapes["optimizer"].items():
        idx = int(key.split(".", 1)[0])
        if wanted is not None and idx not in wanted:
            continue
        p = params[idx]
        start, end = _rows_for(p, shape, parallel)
        rows = _read_rows(path, "optimizer", key, shape, saved_world, start, end, False).to(_local(p).device)
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            rows = DTensor.from_local(rows, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        tensors[key] = rows
    return join_optimizer_state(tensors, meta["optimizer"])
