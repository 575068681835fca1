"""Pipeline parallelism: the layer stack split into stages, micro-batches on point-to-point send/recv.

`PipelineStage(model, stage, n_stages, virtual=v)` keeps, on this rank, only its slices of the
Transformer's blocks (plus the embedding on the first stage, the final norm, head and loss on the
last); the other blocks are dropped. With `virtual` = v > 1 the stack is cut into p·v "virtual
stages" and rank s holds virtual stages s, s + p, s + 2p, … (its v model chunks: Megatron's
interleaved schedule). `run_pipeline(stage, inputs, targets, n_micro, schedule)` runs one training
step's forward and backward over `n_micro` micro-batches and leaves the gradients in the stage's
parameters; the loss equals single-process gradient accumulation over the same micro-batches:
    loss = Σ_micro ce_sum / N_tokens(whole batch) + mean_micro(aux terms of every stage),
which for a dense model without z-loss is exactly the full-batch loss.

Schedules (each a list of ("F" | "B", micro, chunk) actions per stage; `gpipe`, `one_f_one_b`,
`interleaved_1f1b`):
- GPipe: all forwards, then all backwards. Holds m micro-batches of activations.
- 1F1B: p − s − 1 warm-up forwards on stage s, then alternate one forward / one backward, then
  drain. Same bubble as GPipe, (p − 1)/(m + p − 1) of the time with equal stage costs, but at most
  p − s micro-batches of activations are alive on stage s.
- interleaved 1F1B (Narayanan et al. 2021, §2.2): the m·v (micro-batch, chunk) units run in groups
  of p micro-batches per chunk; stage s warms up with 2(p − s − 1) + (v − 1)p forwards, then 1F1B.
  Each unit costs 1/v of a stage's work, so the bubble shrinks v-fold: the paper's bubble time over
  ideal time is (1/v)(p − 1)/m, i.e. (p − 1)/(v·m + p − 1) of the total time (`bubble_formula`).
  Needs m divisible by p; costs v times more point-to-point messages and more warm-up activations.
`simulate(schedule, p, m, t_f, t_b, virtual)` replays the action lists with their data dependencies
under a simple cost model (every stage's forward t_f, backward t_b, split evenly over its chunks;
one cost for all stages, or one per stage, e.g. the measured ones; free communication) and returns
the bubble fraction per stage; `run_pipeline` also returns the measured one (1 − busy / wall; CUDA
events on GPU, so it is the device's idle time) and the timeline of every action. With unequal
stages (the first embeds, the last runs the head and the loss) the lighter stages wait for the
heaviest, which the formula's equal costs leave out: `split` (layers per virtual stage) rebalances.

Sends are `isend` (waited at the end of the step). Each stage's next receive on every message
stream is posted ahead (`irecv`, as soon as the previous message of that stream was used and this
stage's own send on it, if any, was posted), so a message moves while the stage computes instead of
after; its use waits for it (on NCCL a stream wait, not a host one). Each message stream (activations forward,
gradients backward, and for interleaving the wrap-around from the last rank to the first and back)
has its own process group (`pipeline_links`): within one stream the sender's and receiver's orders
agree, and NCCL, which runs one communicator's operations in issue order, never queues a send of one
stream behind a receive of another (with one shared group, 1F1B deadlocks on large activations).

Composition (mesh.py sets these): tied embeddings (first and last stage hold the matrix, made equal
at construction, gradient summed after the step); data parallelism over stage replicas (pass the
handle as `reducer`: `no_sync()` for all but the last backward, `finish()` after it); tensor +
sequence parallelism (`seq_split` = tp: the activations between stages are this rank's T/tp
positions); context parallelism (`cp_group`: every stage runs its zig-zag part of each sequence,
and the loss is this rank's share, Σ over the cp group = the pipeline's loss). Not here: zero-bubble
schedules, MTP heads, doc_ids.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved")
Action = tuple[str, int, int]  # ("F" | "B", micro-batch, model chunk)


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """Contiguous layer indices of `stage` (the first `n_layers % n_stages` stages get one more)."""
    if not 1 <= n_stages <= n_layers:
        raise ConfigError(f"pipeline: {n_stages} stages for {n_layers} layers (need 1 <= stages <= layers)")
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def split_layers(n_layers: int, n_parts: int, split: list[int] | None = None) -> list[range]:
    """Layer indices of each of `n_parts` (virtual) stages: `split` layers each, or as even as
    `stage_layers` makes them."""
    if split is None:
        return [stage_layers(n_layers, n_parts, i) for i in range(n_parts)]
    split = list(split)
    if len(split) != n_parts or min(split) < 1 or sum(split) != n_layers:
        raise ConfigError(f"pipeline split {split}: needs {n_parts} stage sizes (pp × virtual), each >= 1, "
                          f"summing to n_layers = {n_layers}")
    ends = [0] + torch.tensor(split).cumsum(0).tolist()
    return [range(a, b) for a, b in zip(ends[:-1], ends[1:])]


def gpipe(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    return [("F", i, 0) for i in range(n_micro)] + [("B", i, 0) for i in range(n_micro)]


def one_f_one_b(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    warm = min(n_stages - stage - 1, n_micro)
    actions = [("F", i, 0) for i in range(warm)]
    for i in range(warm, n_micro):
        actions += [("F", i, 0), ("B", i - warm, 0)]
    actions += [("B", i, 0) for i in range(n_micro - warm, n_micro)]
    return actions


def interleaved_1f1b(stage: int, n_stages: int, n_micro: int, virtual: int) -> list[Action]:
    """Megatron's interleaved schedule: unit k (of m·v) is micro-batch (k // pv)·p + k % p of chunk
    (k % pv) // p (backwards walk the chunks in reverse)."""
    p, v, m = n_stages, virtual, n_micro
    if p < 2 or v < 2:
        raise ConfigError(f"interleaved pipeline: needs pp >= 2 and virtual stages >= 2 (got {p}, {v})")
    if m % p:
        raise ConfigError(f"interleaved pipeline: n_micro = {m} must be a multiple of pp = {p}")

    def unit(k: int, kind: str) -> Action:
        group, r = divmod(k, p * v)
        chunk = r // p
        return kind, group * p + r % p, (chunk if kind == "F" else v - 1 - chunk)

    total = m * v
    warm = min(2 * (p - stage - 1) + (v - 1) * p, total)
    actions = [unit(k, "F") for k in range(warm)]
    for j in range(total - warm):
        actions += [unit(warm + j, "F"), unit(j, "B")]
    return actions + [unit(k, "B") for k in range(total - warm, total)]


def schedule_actions(name: str, stage: int, n_stages: int, n_micro: int, virtual: int = 1) -> list[Action]:
    if name not in SCHEDULES:
        raise ConfigError(f"pipeline schedule {name!r} must be one of {SCHEDULES}")
    if name == "interleaved":
        return interleaved_1f1b(stage, n_stages, n_micro, virtual)
    if virtual != 1:
        raise ConfigError(f"pipeline schedule {name!r} runs one model chunk per rank: use 'interleaved' "
                          f"for virtual = {virtual}")
    return (gpipe if name == "gpipe" else one_f_one_b)(stage, n_stages, n_micro)


def bubble_formula(n_stages: int, n_micro: int, virtual: int = 1) -> float:
    """Idle fraction of a step with equal stage costs: (p − 1)/(v·m + p − 1)."""
    return (n_stages - 1) / (virtual * n_micro + n_stages - 1)


def simulate(name: str, n_stages: int, n_micro: int, t_f: float | list[float] = 1.0,
             t_b: float | list[float] = 2.0, virtual: int = 1) -> list[float]:
    """Bubble fraction of each stage when the schedule's actions run as early as their inputs allow.
    `t_f` / `t_b`: a stage's forward / backward cost per micro-batch, or a list of one per stage."""
    p, v = n_stages, virtual
    t_f = list(t_f) if isinstance(t_f, (list, tuple)) else [t_f] * p
    t_b = list(t_b) if isinstance(t_b, (list, tuple)) else [t_b] * p
    plans = [schedule_actions(name, s, p, n_micro, v) for s in range(p)]
    last = p * v - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage, micro) -> end time
    free = [0.0] * p
    pos = [0] * p
    while any(pos[s] < len(plans[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(plans[s]):
                continue
            kind, i, c = plans[s][pos[s]]
            vs = c * p + s
            if kind == "F":
                deps = [("F", vs - 1, i)] if vs > 0 else []
            else:
                deps = [("F", vs, i)] + ([("B", vs + 1, i)] if vs < last else [])
            if all(d in done for d in deps):
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, vs, i)] = start + (t_f[s] if kind == "F" else t_b[s]) / v
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name} deadlocks")  # a bug in the action lists
    makespan = max(free)
    return [1.0 - n_micro * (t_f[s] + t_b[s]) / makespan for s in range(p)]


def pipeline_links(ranks: list[int]) -> dict[str, object]:
    """One process group per message stream of a pipeline over `ranks` (collective: every process
    calls it, for every pipeline, in the same order)."""
    return {name: dist.new_group(ranks) for name in ("act", "grad", "act_wrap", "grad_wrap")}


class PipelineStage(nn.Module):
    """One stage of a Transformer: its blocks (v chunks), plus embedding (first) or norm/head/loss (last)."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int, group=None, tied_group=None,
                 virtual: int = 1, links: dict | None = None, split: list[int] | None = None):
        """`group`: the pipeline's ranks (None: the whole world is one pipeline). `split`: layers per
        virtual stage (p·v numbers; default as even as possible), e.g. fewer on the last stage,
        which also runs the head and the loss. `tied_group` (the
        first and last stage ranks, for tied embeddings) and `links` (`pipeline_links`) are needed
        when several pipelines run side by side: new_group must be entered by every process, so the
        mesh (mesh.build_mesh) makes them for all pipelines."""
        super().__init__()
        cfg = model.cfg
        if getattr(cfg, "mtp_depth", 0):
            raise ConfigError("pipeline parallelism does not support multi-token prediction (mtp_depth > 0)")
        if not 0 <= stage < n_stages:
            raise ConfigError(f"pipeline stage {stage} is not in [0, {n_stages})")
        if virtual < 1:
            raise ConfigError(f"pipeline: virtual stages per rank = {virtual} must be >= 1")
        self.stage, self.n_stages, self.virtual, self.group = stage, n_stages, virtual, group
        self.first, self.last = stage == 0, stage == n_stages - 1
        parts = split_layers(cfg.n_layers, n_stages * virtual, split)
        chunks = [parts[c * n_stages + stage] for c in range(virtual)]
        self.layers = [i for chunk in chunks for i in chunk]
        ends = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0).tolist()
        self.chunk_blocks = [range(a, b) for a, b in zip(ends[:-1], ends[1:])]  # local block indices
        self.tied = cfg.tie_embeddings
        self.seq_split, self.cp_group = 1, None  # set by mesh.parallelize (tensor / context parallel)
        model.blocks = nn.ModuleList(model.blocks[i] for i in self.layers)
        model.layer_ids = self.layers
        if not self.first:
            model.pos_emb = None
        if not (self.first or (self.last and self.tied)):
            model.tok_emb = None
        if not self.last:
            model.norm_f = nn.Identity()
            model.lm_head = None
        self.model = model
        if links is None and n_stages > 1:
            if dist.get_world_size() != n_stages:
                raise ConfigError("pipeline: several pipelines side by side need `links` (and tied_group): "
                                  "mesh.build_mesh makes them")
            links = pipeline_links(list(range(n_stages)))
        self.links = links or {}
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

    def forward(self, x, positions, targets=None, chunk: int = 0):
        """x: input ids (first stage, chunk 0) or the previous virtual stage's hidden states. Returns
        (hidden states or loss terms (ce_sum + z-loss·z_sum), aux sum)."""
        m = self.model
        if self.first and chunk == 0:
            x = m.embed(x, positions)
        aux = x.new_zeros((), dtype=torch.float32)
        for b in self.chunk_blocks[chunk]:
            x, block_aux, _ = m.blocks[b](x, positions, None)
            for v in block_aux.values():
                aux = aux + v
        if not (self.last and chunk == self.virtual - 1):
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
    peak_live_micro: int  # most (micro-batch, chunk) activations alive at once
    timeline: list = field(default_factory=list)  # (action, micro, chunk, start, end) seconds from the start

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.wall_s


class _Clock:
    """Marks on the device timeline: CUDA events (the GPU runs asynchronously) or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def run_pipeline(stage: PipelineStage, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int,
                 schedule: str = "1f1b", reducer=None) -> PipelineResult:
    """Forward + backward of one step over `n_micro` micro-batches (gradients accumulate in the stage).

    Every stage is given the same whole-batch `inputs` / `targets` [B, T] (only the first stage reads
    the ids, only the last the targets; all use the shape and the total token count; with context
    parallelism each rank takes its zig-zag part). `reducer`: a data-parallel handle over this
    stage's replicas (`no_sync()`, `finish()`, e.g. mesh.parallelize's); it communicates only during
    the stage's last backward, then `finish()` is called.
    """
    B, T = inputs.shape
    if B % n_micro:
        raise ConfigError(f"pipeline: batch of {B} rows does not split into {n_micro} micro-batches")
    p, s, v = stage.n_stages, stage.stage, stage.virtual
    actions = schedule_actions(schedule, s, p, n_micro, v)
    rows = B // n_micro
    n_tokens = (targets != -100).sum().clamp_min(1).to(torch.float32)  # of the whole (unsplit) batch
    positions = torch.arange(T, device=inputs.device)
    cp = 1
    if stage.cp_group is not None:
        from lmforge.distributed.ring_attention import shard_sequence, zigzag_indices

        cp, r = dist.get_world_size(stage.cp_group), dist.get_rank(stage.cp_group)
        inputs, targets = shard_sequence(inputs, 1, r, cp), shard_sequence(targets, 1, r, cp)
        positions = zigzag_indices(T, r, cp).to(inputs.device)
    positions = positions.expand(rows, -1)
    cfg = stage.model.cfg
    dtype = next(stage.parameters()).dtype  # the residual stream's (autocast leaves it in this dtype)
    act_shape = (rows, T // cp // stage.seq_split, cfg.d_model)
    prev, nxt = stage._global((s - 1) % p), stage._global((s + 1) % p)
    link = stage.links
    last_vs = p * v - 1

    last_backward = max(j for j, (kind, _, _) in enumerate(actions) if kind == "B")
    saved: dict[tuple[int, int], tuple] = {}  # (chunk, micro) -> (stage input, output, aux) for the backward
    sends = []
    # every receive of this stage, per message stream in the order the actions use them; the next one
    # of each stream is always posted ahead (`_post`), so its transfer overlaps this stage's compute
    wanted: dict[str, list] = {}
    for kind, i, c in actions:
        vs = c * p + s
        if kind == "F" and vs > 0:
            wanted.setdefault("act_wrap" if s == 0 else "act", []).append(("F", i, c))
        elif kind == "B" and vs < last_vs:
            wanted.setdefault("grad_wrap" if s == p - 1 else "grad", []).append(("B", i, c))
    posted: dict[tuple, tuple] = {}  # (kind, micro, chunk) -> (buffer, work)

    def _post(name: str) -> None:
        if wanted.get(name):
            buf = torch.empty(act_shape, dtype=dtype, device=inputs.device)
            posted[wanted[name].pop(0)] = (buf, dist.irecv(buf, prev if name.startswith("act") else nxt,
                                                            group=link[name]))

    def _received(key: tuple) -> torch.Tensor:
        buf, work = posted.pop(key)
        work.wait()
        return buf

    for name in wanted:
        _post(name)
    ce_total = torch.zeros((), dtype=torch.float64, device=inputs.device)  # summed on the device: no sync
    aux_total = torch.zeros_like(ce_total)
    peak, marks = 0, []
    clock = _Clock(inputs.device)
    t0 = clock.mark()
    for j, (kind, i, c) in enumerate(actions):
        vs = c * p + s
        mb = slice(i * rows, (i + 1) * rows)
        if kind == "F":
            if vs == 0:
                x_in = inputs[mb]
            else:
                x_in = _received(("F", i, c)).requires_grad_()
            start = clock.mark()
            out, aux = stage(x_in, positions, targets[mb] if vs == last_vs else None, chunk=c)
            marks.append(("F", i, c, start, clock.mark()))
            if vs < last_vs:
                name = "act_wrap" if s == p - 1 else "act"
                sends.append(dist.isend(out.detach().contiguous(), nxt, group=link[name]))
            if vs > 0:  # after this stage's own send on the stream (p > 2: the same group both ways)
                _post("act_wrap" if s == 0 else "act")
            saved[(c, i)] = (x_in, out, aux)
            peak = max(peak, len(saved))
        else:
            x_in, out, aux = saved.pop((c, i))
            if vs == last_vs:
                ce_total += out.detach().double()
                grad = None
                out = out / n_tokens
            else:
                grad = _received(("B", i, c))
            aux_total += aux.detach().double() / (n_micro * cp)
            start = clock.mark()
            outs, grads = [out], [grad]
            if aux.requires_grad:  # each cp rank's aux terms count for 1/cp (its share)
                outs.append(aux / (n_micro * cp))
                grads.append(None)
            sync = reducer is None or j == last_backward
            with contextlib.nullcontext() if sync else reducer.no_sync():
                torch.autograd.backward(outs, grads)
            marks.append(("B", i, c, start, clock.mark()))
            if vs > 0:
                name = "grad_wrap" if s == 0 else "grad"
                sends.append(dist.isend(x_in.grad.contiguous(), prev, group=link[name]))
            if vs < last_vs:
                _post("grad_wrap" if s == p - 1 else "grad")
    end = clock.mark()
    for req in sends:
        req.wait()
    if reducer is not None:
        reducer.finish()
    if stage._sum_tied:
        dist.all_reduce(stage.model.tok_emb.weight.grad, group=stage._tied_group)
    if clock.cuda:
        torch.cuda.synchronize()
    timeline = [(k, i, c, clock.seconds(t0, a), clock.seconds(t0, b)) for k, i, c, a, b in marks]
    busy = sum(b - a for *_, a, b in timeline)
    loss = (ce_total / n_tokens.double() + aux_total).reshape(1)
    if p > 1:
        dist.all_reduce(loss, group=stage.group)  # ce from the last stage, aux from every stage
    if cp > 1:
        dist.all_reduce(loss, group=stage.cp_group)  # every cp rank's share
    return PipelineResult(loss=loss.item(), busy_s=busy, wall_s=clock.seconds(t0, end), peak_live_micro=peak,
                          timeline=timeline)
