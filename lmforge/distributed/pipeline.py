"""Pipeline parallelism: the layer stack split into stages, micro-batches on point-to-point send/recv.

`PipelineStage(model, stage, n_stages)` keeps, on this rank, only its contiguous slice of the
Transformer's blocks (plus the embedding on the first stage, the final norm, head and loss on the
last); the other blocks are dropped. `run_pipeline(stage, inputs, targets, n_micro, schedule)` runs
one training step's forward and backward over `n_micro` micro-batches and leaves the gradients in the
stage's parameters; the loss equals single-process gradient accumulation over the same micro-batches:
    loss = Σ_micro ce_sum / N_tokens(whole batch) + mean_micro(aux terms of every stage),
which for a dense model without z-loss is exactly the full-batch loss.

Schedules (each a list of ("F", i) / ("B", i) actions per stage; `gpipe`, `one_f_one_b`):
- GPipe: all forwards, then all backwards. Holds m micro-batches of activations.
- 1F1B: p − s − 1 warm-up forwards on stage s, then alternate one forward / one backward, then
  drain. Same bubble as GPipe, (p − 1)/(m + p − 1) of the time with equal stage costs, but at most
  p − s micro-batches of activations are alive on stage s.
`simulate(schedule, p, m, t_f, t_b)` replays the action lists with their data dependencies under a
simple cost model (every forward t_f, backward t_b, free communication) and returns the bubble
fraction per stage; `run_pipeline` also returns the measured one (1 − busy / wall).

Sends are `isend` (waited at the end of the step) and receives blocking, so a stage never deadlocks
waiting for a neighbour that is itself sending. Activations flow s → s+1, gradients s+1 → s: one
direction per pair, so messages match in order.

Tied embeddings: the first and last stage both hold the embedding matrix (input table, output head);
it is made equal at construction and its gradient summed over those two stages after each step.
Data parallelism over stage replicas: pass the DDP handle as `reducer` (it syncs on the last
backward only). Not here: interleaved (virtual-stage) schedules, zero-bubble schedules, MTP heads,
doc_ids.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b")


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """Contiguous layer indices of `stage` (the first `n_layers % n_stages` stages get one more)."""
    if not 1 <= n_stages <= n_layers:
        raise ConfigError(f"pipeline: {n_stages} stages for {n_layers} layers (need 1 <= stages <= layers)")
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def gpipe(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]


def one_f_one_b(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    warm = min(n_stages - stage - 1, n_micro)
    actions = [("F", i) for i in range(warm)]
    for i in range(warm, n_micro):
        actions += [("F", i), ("B", i - warm)]
    actions += [("B", i) for i in range(n_micro - warm, n_micro)]
    return actions


def schedule_actions(name: str, stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    if name not in SCHEDULES:
        raise ConfigError(f"pipeline schedule {name!r} must be one of {SCHEDULES}")
    return (gpipe if name == "gpipe" else one_f_one_b)(stage, n_stages, n_micro)


def bubble_formula(n_stages: int, n_micro: int) -> float:
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate(name: str, n_stages: int, n_micro: int, t_f: float = 1.0, t_b: float = 2.0) -> list[float]:
    """Bubble fraction of each stage when the schedule's actions run as early as their inputs allow."""
    plans = [schedule_actions(name, s, n_stages, n_micro) for s in range(n_stages)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * n_stages
    pos = [0] * n_stages
    while any(pos[s] < len(plans[s]) for s in range(n_stages)):
        progressed = False
        for s in range(n_stages):
            if pos[s] == len(plans[s]):
                continue
            kind, i = plans[s][pos[s]]
            deps = [("F", s - 1, i)] if kind == "F" and s > 0 else []
            if kind == "B":
                deps = [("F", s, i)] + ([("B", s + 1, i)] if s < n_stages - 1 else [])
            if all(d in done for d in deps):
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, s, i)] = start + (t_f if kind == "F" else t_b)
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name} deadlocks")  # a bug in the action lists
    makespan = max(free)
    return [1.0 - n_micro * (t_f + t_b) / makespan for _ in range(n_stages)]


class PipelineStage(nn.Module):
    """One stage of a Transformer: its blocks, plus embedding (first) or norm/head/loss (last)."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int, group=None, tied_group=None):
        """`tied_group`: the group of this pipeline's first and last stage ranks, needed for tied
        embeddings when several pipelines run side by side (new_group must be entered by every
        process with the same ranks, so the mesh builds these pairs for all pipelines)."""
        super().__init__()
        cfg = model.cfg
        if getattr(cfg, "mtp_depth", 0):
            raise ConfigError("pipeline parallelism does not support multi-token prediction (mtp_depth > 0)")
        if not 0 <= stage < n_stages:
            raise ConfigError(f"pipeline stage {stage} is not in [0, {n_stages})")
        self.stage, self.n_stages, self.group = stage, n_stages, group
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.layers = stage_layers(cfg.n_layers, n_stages, stage)
        self.tied = cfg.tie_embeddings
        model.blocks = nn.ModuleList(model.blocks[i] for i in self.layers)
        if not self.first:
            model.pos_emb = None
        if not (self.first or (self.last and self.tied)):
            model.tok_emb = None
        if not self.last:
            model.norm_f = nn.Identity()
            model.lm_head = None
        self.model = model
        self._sum_tied, self._tied_group = False, None
        if self.tied and n_stages > 1:
            ranks = [self._global(0), self._global(n_stages - 1)]
            pair = tied_group
            if pair is None:
                if dist.get_world_size() != n_stages:
                    raise ConfigError("pipeline with tied embeddings and several pipelines: pass tied_group "
                                      "(the first and last stage ranks; mesh.build_mesh makes it)")
                pair = dist.new_group(ranks) if n_stages > 2 else group
            if self.first or self.last:
                self._sum_tied, self._tied_group = True, pair
                dist.broadcast(model.tok_emb.weight.data, ranks[0], group=pair)

    def _global(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage) if self.group is not None else stage

    def reference_name(self, name: str) -> str:
        """This stage's parameter name -> the unsplit Transformer's name (blocks renumbered back)."""
        name = name.removeprefix("model.")
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            return f"blocks.{self.layers[int(i)]}.{rest}"
        return name

    def forward(self, x, positions, targets=None):
        """x: input ids (first stage) or the previous stage's hidden states. Returns (hidden states or
        loss terms (ce_sum + z-loss·z_sum), aux sum)."""
        m = self.model
        if self.first:
            x = m.embed(x, positions)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in m.blocks:
            x, block_aux, _ = block(x, positions, None)
            for v in block_aux.values():
                aux = aux + v
        if not self.last:
            return x, aux
        _, ce_sum, _, z_sum = m.loss_terms(m.norm_f(x), targets)
        if z_sum is not None:
            ce_sum = ce_sum + m.cfg.z_loss * z_sum
        return ce_sum, aux


@dataclass
class PipelineResult:
    loss: float  # the step's loss (same on every stage)
    busy_s: float  # this stage's compute time
    wall_s: float  # the step's wall time on this stage
    peak_live_micro: int  # most micro-batches whose activations were alive at once
    timeline: list = field(default_factory=list)  # (action, micro, start, end) seconds from the start

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.wall_s


def run_pipeline(stage: PipelineStage, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int,
                 schedule: str = "1f1b", reducer=None) -> PipelineResult:
    """Forward + backward of one step over `n_micro` micro-batches (gradients accumulate in the stage).

    Every stage is given the same whole-batch `inputs` / `targets` [B, T] (only the first stage reads
    the ids, only the last the targets; all use the shape and the total token count).
    `reducer`: a data-parallel handle over this stage's replicas (ddp.py: `no_sync()`, `finish()`);
    it communicates only during the stage's last backward, then `finish()` is called.
    """
    B, T = inputs.shape
    if B % n_micro:
        raise ConfigError(f"pipeline: batch of {B} rows does not split into {n_micro} micro-batches")
    p, s = stage.n_stages, stage.stage
    actions = schedule_actions(schedule, s, p, n_micro)
    rows = B // n_micro
    n_tokens = (targets != -100).sum().clamp_min(1).to(torch.float32)
    positions = torch.arange(T, device=inputs.device).expand(rows, T)
    cfg = stage.model.cfg
    dtype = next(stage.parameters()).dtype
    act_shape = (rows, T, cfg.d_model)
    prev = stage._global(s - 1) if s > 0 else None
    nxt = stage._global(s + 1) if s < p - 1 else None

    last_backward = max(j for j, (kind, _) in enumerate(actions) if kind == "B")
    saved: dict[int, tuple] = {}  # micro -> (stage input, output, aux) kept for the backward
    sends, ce_total, aux_total = [], 0.0, 0.0
    busy, peak, timeline = 0.0, 0, []
    t0 = time.perf_counter()
    for j, (kind, i) in enumerate(actions):
        mb = slice(i * rows, (i + 1) * rows)
        if kind == "F":
            if stage.first:
                x_in = inputs[mb]
            else:
                x_in = torch.empty(act_shape, dtype=dtype, device=inputs.device)
                dist.recv(x_in, prev, group=stage.group)
                x_in.requires_grad_()
            start = time.perf_counter()
            out, aux = stage(x_in, positions, targets[mb] if stage.last else None)
            busy += time.perf_counter() - start
            timeline.append(("F", i, start - t0, time.perf_counter() - t0))
            if nxt is not None:
                sends.append(dist.isend(out.detach().contiguous(), nxt, group=stage.group))
            saved[i] = (x_in, out, aux)
            peak = max(peak, len(saved))
        else:
            x_in, out, aux = saved.pop(i)
            if stage.last:
                ce_total += out.item()
                grad = None
                out = out / n_tokens
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, nxt, group=stage.group)
            aux_total += aux.item() / n_micro
            start = time.perf_counter()
            outs, grads = [out], [grad]
            if aux.requires_grad:
                outs.append(aux / n_micro)
                grads.append(None)
            sync = reducer is None or j == last_backward
            with contextlib.nullcontext() if sync else reducer.no_sync():
                torch.autograd.backward(outs, grads)
            busy += time.perf_counter() - start
            timeline.append(("B", i, start - t0, time.perf_counter() - t0))
            if prev is not None:
                sends.append(dist.isend(x_in.grad.contiguous(), prev, group=stage.group))
    for req in sends:
        req.wait()
    if reducer is not None:
        reducer.finish()
    if stage._sum_tied:
        dist.all_reduce(stage.model.tok_emb.weight.grad, group=stage._tied_group)
    wall = time.perf_counter() - t0
    loss = torch.tensor([ce_total / n_tokens.item() + aux_total], dtype=torch.float64)
    if p > 1:
        dist.all_reduce(loss, group=stage.group)  # ce from the last stage, aux from every stage
    return PipelineResult(loss=loss.item(), busy_s=busy, wall_s=wall, peak_live_micro=peak, timeline=timeline)
