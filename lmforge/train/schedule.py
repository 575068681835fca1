"""Learning-rate schedules (as a multiplier of each group's base LR) and global-norm clipping.

Schedules are plain functions of the step, so they need no state in a checkpoint:
- "cosine": linear warmup, then cosine decay from 1 to `min_lr_ratio` at `total_steps`.
- "wsd": warmup–stable–decay: linear warmup, constant 1, then a linear decay to `min_lr_ratio`
  over the last `decay_fraction` of the steps (Hu et al., MiniCPM).
- "constant": linear warmup, then 1.

Step numbering: `lr_factor(step)` is the factor for the update made at 0-based step `step`; warmup
reaches 1 at step `warmup_steps` (the first update uses 1/(warmup+1), never 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lmforge.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, schedule: str, total_steps: int, warmup_steps: int = 0,
              min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule = {schedule!r} must be one of {list(SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"]) * factor


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None,
                   divide_by: torch.Tensor | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients (fp32); scales them to `max_norm` when it is exceeded.

    `divide_by` (a positive 0-d tensor, e.g. the step's token count) first divides the gradients by
    it, folded into the same single pass that clips: the norm is measured as ||g|| / divide_by.
    Returns the norm before clipping (a 0-d tensor: read it with .item() when you need it, which
    syncs). `max_norm` None or <= 0 only measures. A non-finite norm leaves the gradients alone.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    scale = None
    if divide_by is not None:
        total = total / divide_by.float()
        scale = 1.0 / divide_by.float()
    if max_norm is not None and max_norm > 0:
        # clamp instead of an `if` on the value: no host sync; the factor is 1 when under the limit.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
        scale = coef if scale is None else scale * coef
    if scale is not None:
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total
