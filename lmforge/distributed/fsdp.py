"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models one device cannot hold.

`apply_fsdp(model, ...)` applies, in this order (torchtitan's `parallelize` order):
1. activation checkpointing of every block (optional: recompute activations in backward), then
2. `fully_shard` on every transformer block, then on the root (embeddings, final norm, head).
Each parameter becomes a DTensor sharded on dim 0 over the mesh; a block's parameters are
all-gathered just before it runs and freed after (`reshard_after_forward`), and gradients are
reduce-scattered so each rank keeps only its shard. Optimizers see the sharded DTensors, so their
state is sharded too (ZeRO-3).

Mixed precision (`param_dtype="bf16"`): compute in bf16 while the sharded master weights, the
optimizer state and the gradient reduction stay in fp32 (`reduce_dtype`).

On CPU it runs with gloo over `init_device_mesh("cpu", (world,))`, which is how it is tested.
This module does not implement sharding itself (the algorithm lives in torch); our own data
parallelism is ddp.py / zero.py.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}


def block_list(model: nn.Module) -> nn.ModuleList:
    for name in ("blocks", "layers", "h"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ConfigError(f"FSDP: {type(model).__name__} has no 'blocks'/'layers'/'h' module list to shard")


def default_mesh(device: torch.device | str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def apply_fsdp(model: nn.Module, *, mesh=None, param_dtype: str | None = None, reduce_dtype: str = "fp32",
               activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2; returns it (its class becomes an FSDP subclass, names unchanged)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype not in _DTYPES or reduce_dtype not in _DTYPES:
        raise ConfigError(f"FSDP param_dtype = {param_dtype!r} / reduce_dtype = {reduce_dtype!r} must be "
                          f"one of {[k for k in _DTYPES if k]} (or None for param_dtype)")
    if mesh is None:
        mesh = default_mesh(next(model.parameters()).device)
    if activation_checkpointing:
        from lmforge.train.trainer import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    for block in block_list(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root keeps embeddings/head; no reshard after forward: backward needs them again at once
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters and buffers on CPU (a collective: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
