"""The process group: start it from torchrun's environment, ask who we are, agree across ranks.

`init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun, or by a test that spawns
processes), picks NCCL on GPUs and gloo on CPU, and pins each process to its local GPU. Without those
variables it returns a world of one and starts nothing, so single-process code paths need no branch.

`check_same_on_ranks(value, what)` is the guard against ranks that silently disagree (a different
config file, different data): it compares a hash of `value` across ranks and raises naming `what`.

This module does not launch processes (see launch.py) and holds no training logic.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {value!r} must be an integer") from None


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's environment (idempotent).

    device: "auto" (the local GPU if CUDA is available, else CPU), "cpu" or "cuda".
    backend: None picks "nccl" for CUDA and "gloo" for CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK = {rank} is not in [0, WORLD_SIZE = {world})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"LOCAL_RANK = {local_rank} but this node has {torch.cuda.device_count()} "
                              "GPUs: start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                device_id=dev if use_cuda else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled in memory between our own processes only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_on_ranks(value, what: str) -> None:
    """Raise ConfigError on every rank when `value` (JSON-able) differs between ranks."""
    digests = all_gather_object(_digest(value))
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        raise ConfigError(f"ranks disagree on {what}: ranks {list(groups.values())} hold different values "
                          "(same config files, overrides and data on every node?)")
