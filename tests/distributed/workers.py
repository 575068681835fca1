"""Code run inside spawned gloo processes (and, for references, in the test process itself).

Each test module spawns ONE group of processes that runs several scenarios and writes results to a
directory (process start-up dominates the cost on a 2-core machine), then asserts in the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

VOCAB = 53
ROWS = 8  # global batch rows
T = 11
STEPS = 3
BUCKET_MB = 0.004  # ~4 KB: several buckets for the tiny model


def tiny_model(seed: int = 0, **kw):
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, context_length=16, d_model=24, n_layers=2, n_heads=3,
                                n_kv_heads=1, d_ff=40, tie_embeddings=True), **kw})
    return Transformer(cfg), cfg


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (ROWS, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def adamw(model):
    from lmforge.train.optim import build_optimizer

    return build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1, vocab_size=VOCAB)


def muon(model):
    from lmforge.train.optim import build_optimizer

    return build_optimizer(model, "muon", lr=1e-2, muon_lr=0.02, vocab_size=VOCAB)


def train_steps(model, opt, rank=0, world=1, reducer=None, accum=1, steps=STEPS, loss_fn=None, grads=None,
                zero_grad=None, on_step=None):
    """Mean-CE training on this rank's rows; the reducer averages (op='mean'). Returns losses; fills
    `grads` (a dict) with the synchronized gradients of the first step. `zero_grad` replaces
    `opt.zero_grad(set_to_none=True)`; `on_step(s)` runs after the gradients are synchronized."""
    losses = []
    per = ROWS // world
    for s in range(steps):
        x, y = global_batch(s)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        zero_grad() if zero_grad else opt.zero_grad(set_to_none=True)
        micro = per // accum
        total = 0.0
        for i in range(accum):
            sync = reducer is None or i == accum - 1
            with contextlib.nullcontext() if sync else reducer.no_sync():
                xb, yb = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
                loss = loss_fn(model, xb, yb) if loss_fn else model(xb, yb).loss
                (loss / accum).backward()
                total += loss.item() / accum
        if reducer is not None:
            reducer.finish()
        if grads is not None and s == 0:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if on_step is not None:
            on_step(s)
        opt.step()
        losses.append(total)
    return losses


class PartlyUsed(nn.Module):
    """Tied embedding/head, a layer every rank uses, one only rank 0 uses, one nobody uses."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 10)
        self.mid = nn.Linear(10, 10)
        self.sometimes = nn.Linear(10, 10)
        self.never = nn.Linear(10, 10)
        self.head = nn.Linear(10, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, y, use_sometimes: bool):
        h = torch.tanh(self.mid(self.emb(x)))
        if use_sometimes:
            h = h + self.sometimes(h)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


class Scrambled(nn.Module):
    """Registration order (last, first, mid) is not the use order (first, mid, last): reverse
    registration order is not the gradient-ready order, so DDP must rebuild its buckets."""

    def __init__(self):
        super().__init__()
        self.last = nn.Linear(10, VOCAB)
        self.first = nn.Embedding(VOCAB, 10)
        self.mid = nn.Linear(10, 10)

    def forward(self, x, y):
        logits = self.last(torch.tanh(self.mid(self.first(x))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def partly_used_losses(rank: int, world: int):
    """Loss function of rank `rank`: only rank 0's rows go through `sometimes`."""
    def fn(model, x, y):
        return model(x, y, use_sometimes=rank == 0)
    return fn


def partly_used_reference(model, opt, world: int = 2):
    """Single process: the mean over ranks of each rank's loss on its rows (what DDP averages)."""
    per = ROWS // world
    for s in range(STEPS):
        x, y = global_batch(s)
        opt.zero_grad(set_to_none=True)
        loss = sum(model(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], use_sometimes=r == 0)
                   for r in range(world)) / world
        loss.backward()
        opt.step()


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def save(out: Path, name: str, rank: int, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.rank{rank}.safetensors"))


# ---------------------------------------------------------------------------------------------------

def _equivalence(rank: int, world: int, out: Path) -> dict:
    from lmforge.distributed.ddp import BucketedDDP, NaiveDDP
    from lmforge.distributed.env import check_same_on_ranks
    from lmforge.distributed.zero import apply_zero

    info: dict = {}
    # own bucketed DDP; ranks start from different weights: the broadcast must fix that
    model, _ = tiny_model(seed=rank)
    # overlap: when the embedding's gradient (the last one backward produces) arrives, the earlier
    # buckets' all-reduces must already be in flight (this hook is registered before DDP's, so it
    # sees the state just before the embedding's own bucket launches)
    launched_before_last: list = []
    model.tok_emb.weight.register_post_accumulate_grad_hook(
        lambda p: launched_before_last.append([b.work is not None for b in ddp.buckets]))
    small_first = BucketedDDP(model, bucket_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB / 4, broadcast=False)
    info["buckets_small_first"] = small_first.bucket_names()
    small_first.remove_hooks()
    ddp = BucketedDDP(model, bucket_mb=BUCKET_MB)
    info["buckets"] = ddp.bucket_names()
    info["bucket_numels"] = [b.nbytes // 4 for b in ddp.buckets]
    info["slots_aligned"] = all(b.views[i].data_ptr() % 16 == 0 for b in ddp.buckets for i in range(len(b.params)))
    g: dict = {}
    info["bucketed_losses"] = train_steps(model, adamw(model), rank, world, ddp, grads=g)
    info["launched_before_last"] = launched_before_last[0]
    save(out, "bucketed", rank, params_of(model))
    save(out, "bucketed_grad", rank, g)

    model, _ = tiny_model(seed=rank)
    naive = NaiveDDP(model)
    g = {}
    train_steps(model, adamw(model), rank, world, naive, grads=g)
    save(out, "naive", rank, params_of(model))
    save(out, "naive_grad", rank, g)

    model, _ = tiny_model(seed=0)
    wrapped = nn.parallel.DistributedDataParallel(model)
    train_steps(wrapped, adamw(model), rank, world, None)
    save(out, "torch_ddp", rank, params_of(model))

    # accumulation: 2 micro-batches of 2 rows per rank, no communication on the first
    model, _ = tiny_model(seed=rank)
    ddp = BucketedDDP(model, bucket_mb=BUCKET_MB)
    x, y = global_batch(0)
    with ddp.no_sync():
        model(x[rank * 2:rank * 2 + 2], y[rank * 2:rank * 2 + 2]).loss.backward()
    local = model.tok_emb.weight.grad.sum().reshape(1)
    both = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(both, local)
    info["no_sync_grads_differ"] = bool(not torch.equal(both[0], both[1]))
    model.zero_grad(set_to_none=True)
    g = {}
    train_steps(model, adamw(model), rank, world, ddp, accum=2, grads=g)
    save(out, "accum", rank, params_of(model))
    save(out, "accum_grad", rank, g)

    # unused and partly used parameters, tied embedding
    torch.manual_seed(rank)
    pm = PartlyUsed()
    ddp = BucketedDDP(pm, bucket_mb=BUCKET_MB)
    train_steps(pm, adamw(pm), rank, world, ddp, loss_fn=partly_used_losses(rank, world))
    info["never_grad_is_none"] = pm.never.weight.grad is None
    # sizes 10, 100, 530: slots padded to 16-byte starts
    info["odd_slots_aligned"] = all(b.views[i].data_ptr() % 16 == 0 for b in ddp.buckets for i in range(len(b.params)))
    save(out, "unused", rank, params_of(pm))
    torch.manual_seed(rank)  # the same through zero_grad(): zeroed buckets, no grad=None in between
    pm = PartlyUsed()
    ddp = BucketedDDP(pm, bucket_mb=BUCKET_MB)
    train_steps(pm, adamw(pm), rank, world, ddp, loss_fn=partly_used_losses(rank, world), zero_grad=ddp.zero_grad)
    info["never_grad_is_none_zeroed"] = pm.never.weight.grad is None
    save(out, "unused_zeroed", rank, params_of(pm))

    info.update(_bucket_views(rank, world, out))

    torch.manual_seed(rank)  # buckets rebuilt in gradient-ready order (one step, then look)
    sm = Scrambled()
    ready: list = []
    names = {id(p): n for n, p in sm.named_parameters()}
    for p in sm.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ready.append(names[id(p)]))
    ddp = BucketedDDP(sm, bucket_mb=BUCKET_MB)
    initial = [n for b in ddp.bucket_names() for n in b]
    train_steps(sm, adamw(sm), rank, world, ddp, steps=1, loss_fn=lambda m, x, y: m(x, y))
    info["scrambled"] = {"initial": initial, "ready": ready,
                         "rebuilt": [n for b in ddp.bucket_names() for n in b]}

    # ZeRO-1 (AdamW, Muon) and ZeRO-2
    for name, make_opt, stage in (("zero1_adamw", adamw, 1), ("zero1_muon", muon, 1), ("zero2_adamw", adamw, 2)):
        model, _ = tiny_model(seed=rank)
        reducer, zero = apply_zero(model, make_opt(model), stage=stage, bucket_mb=BUCKET_MB)
        g = {}
        train_steps(model, zero, rank, world, reducer, grads=g)
        save(out, f"{name}_grad", rank, g)
        info[f"{name}_state_bytes"] = zero.state_bytes()
        if stage == 2:  # after the step only owned gradients are kept
            info["zero2_foreign_grads"] = sum(p.grad is not None for p in zero.params if not zero.owns(p))
            info["zero2_owned_with_grad"] = sum(p.grad is not None for p in zero.params if zero.owns(p))
        save(out, name, rank, params_of(model))

    # FSDP2: fp32 with activation checkpointing equals unsharded; bf16 compute policy runs
    from lmforge.distributed.fsdp import apply_fsdp, full_state_dict

    model, _ = tiny_model(seed=0)
    apply_fsdp(model, activation_checkpointing=True)
    info["fsdp_losses"] = train_steps(model, adamw(model), rank, world, None)
    save(out, "fsdp", rank, {k: v for k, v in full_state_dict(model).items()})
    model, _ = tiny_model(seed=0)
    apply_fsdp(model, param_dtype="bf16")
    info["fsdp_bf16_losses"] = train_steps(model, adamw(model), rank, world, None)
    info["fsdp_bf16_master_dtype"] = str(next(model.parameters()).dtype)

    # MoE expert-load counts are summed over ranks before the routing-bias update
    from lmforge.distributed.parallel import DataParallel
    from lmforge.model.moe import MoEConfig

    moe_model, _ = tiny_model(seed=0, moe=MoEConfig(n_experts=3, top_k=1, aux_free_bias=True))
    dp = DataParallel(moe_model, adamw(moe_model), kind="ddp")
    for i, m in enumerate(moe_model.moe_layers()):
        m.load_counts.copy_(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1) + i)
    dp.reduce_totals(torch.zeros(()), torch.zeros((), dtype=torch.long))
    info["moe_load_counts"] = [m.load_counts.tolist() for m in moe_model.moe_layers()]

    try:
        check_same_on_ranks({"lr": 0.1 * (rank + 1)}, "train config")
        info["disagree_error"] = None
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        info["disagree_error"] = str(e)
    return info


def _bucket_views(rank: int, world: int, out: Path) -> dict:
    """Gradient-as-bucket-view: with accumulation (2 micro-steps) and the tied embedding, through
    `zero_grad()` (autograd accumulates into the buckets) and through set_to_none (one copy in)."""
    return {name: _bucket_views_run(rank, world, out, name, use_zero)
            for name, use_zero in (("views_zeroed", True), ("views_none", False))}


def _bucket_views_run(rank: int, world: int, out: Path, name: str, use_zero: bool) -> dict:
    from lmforge.distributed.ddp import BucketedDDP

    model, _ = tiny_model(seed=rank)
    ddp = None
    ready_order: list = []  # gradient-ready order of every backward (these hooks run before DDP's)
    into_bucket: list = []  # did autograd accumulate straight into the bucket slot?
    names = {id(p): n for n, p in model.named_parameters()}

    def spy(p):
        ready_order.append(names[id(p)])
        b, i, _ = ddp._where[id(p)]
        into_bucket.append(p.grad.data_ptr() == ddp.buckets[b].views[i].data_ptr())

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(spy)
    ddp = BucketedDDP(model, bucket_mb=BUCKET_MB)
    initial = [n for b in ddp.bucket_names() for n in b]
    steps: list = []

    def check(s):  # every gradient is its slot's view; the buckets stay the same tensors
        slots = all(p.grad is not None and p.grad.data_ptr() == b.views[i].data_ptr()
                    and p.grad.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
                    for b in ddp.buckets for i, p in enumerate(b.params))
        steps.append({"slots": slots, "buffers": [b.buffer.data_ptr() for b in ddp.buckets]})
        if s == 0:  # from step 2 on (after the one-time rebuild): count host-syncing calls in ddp.py
            spy_calls.__enter__()

    g: dict = {}
    spy_calls = _HostSyncSpy("lmforge/distributed/ddp.py")
    try:
        train_steps(model, adamw(model), rank, world, ddp, accum=2, grads=g, on_step=check,
                    zero_grad=ddp.zero_grad if use_zero else None)
    finally:
        spy_calls.__exit__()
    save(out, name, rank, params_of(model))
    save(out, f"{name}_grad", rank, g)
    n = len(initial)
    return {"initial": initial, "rebuilt": [n for b in ddp.bucket_names() for n in b],
            "sync_order": ready_order[n:2 * n],  # step 1's second (synchronized) micro-step
            "into_bucket": into_bucket, "steps": steps, "host_sync_calls": spy_calls.calls}


class _HostSyncSpy:
    """Counts calls made from one source file of Tensor methods that wait for the device on CUDA
    (`.item()`, `.tolist()`, `t[i] = v` with a host value): none may happen in the steady state."""

    METHODS = ("item", "tolist", "__setitem__")

    def __init__(self, path: str):
        self.path, self.calls, self.saved = path, [], None

    def __enter__(self):
        import sys

        self.saved = {m: torch.Tensor.__dict__.get(m) for m in self.METHODS}
        for m in self.METHODS:
            original = getattr(torch.Tensor, m)

            def spy(t, *a, _m=m, _original=original, **k):
                if sys._getframe(1).f_code.co_filename.endswith(self.path):
                    self.calls.append(_m)
                return _original(t, *a, **k)
            setattr(torch.Tensor, m, spy)

    def __exit__(self, *exc):
        if self.saved is None:
            return
        for m, v in self.saved.items():
            if v is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, v)
        self.saved = None


def _checkpoint(rank: int, world: int, out: Path, shards: str) -> dict:
    """Trainer + DataParallel: 4 steps with checkpoints every 2; then resume from step 2 on the same
    ranks. For ZeRO-1 (sharded optimizer state) and own DDP."""
    info = {}
    for kind in ("zero1", "ddp", "fsdp"):
        run = out / f"run_{kind}"
        trainer = make_trainer(shards, run, kind, per_rank_batch=ROWS_CKPT // world, max_steps=4)
        trainer.train()
        info[kind] = {"losses": [r["loss"] for r in trainer.history], "tokens": trainer.tokens}
        resumed = make_trainer(shards, None, kind, per_rank_batch=ROWS_CKPT // world, max_steps=4)
        resumed.resume(run / "checkpoints" / "step_000002")
        resumed.train()
        info[kind]["resumed_losses"] = [r["loss"] for r in resumed.history]
    # FSDP continues a DDP (unsharded) checkpoint, and DDP an FSDP (row-sharded) one
    for kind, source in (("fsdp", "ddp"), ("ddp", "fsdp")):
        cross = make_trainer(shards, None, kind, per_rank_batch=ROWS_CKPT // world, max_steps=4)
        cross.resume(out / f"run_{source}" / "checkpoints" / "step_000002")
        cross.train()
        info[f"{kind}_from_{source}"] = [r["loss"] for r in cross.history]
    return info


def _four(rank: int, world: int, out: Path) -> dict:
    """The data-parallel equivalences on 4 ranks (2 rows each): slow test."""
    from lmforge.distributed.ddp import BucketedDDP, NaiveDDP
    from lmforge.distributed.zero import apply_zero

    for name, accum in (("bucketed", 1), ("naive", 1), ("accum", 2)):
        model, _ = tiny_model(seed=rank)
        reducer = NaiveDDP(model) if name == "naive" else BucketedDDP(model, bucket_mb=BUCKET_MB)
        train_steps(model, adamw(model), rank, world, reducer, accum=accum)
        save(out, name, rank, params_of(model))
    for name, stage in (("zero1_adamw", 1), ("zero2_adamw", 2)):
        model, _ = tiny_model(seed=rank)
        reducer, zero = apply_zero(model, adamw(model), stage=stage, bucket_mb=BUCKET_MB)
        train_steps(model, zero, rank, world, reducer)
        save(out, name, rank, params_of(model))
    return {}


def _compiled(rank: int, world: int, out: Path) -> dict:
    """Own DDP under torch.compile (aot_eager: the autograd graph of inductor, no C++ build): per-block
    graphs (hooks fire block by block, buckets launch during backward) and one whole-model graph."""
    return {name: _compiled_run(rank, world, out, name) for name in ("compiled_blocks", "compiled_model")}


def _compiled_run(rank: int, world: int, out: Path, name: str) -> dict:
    from lmforge.distributed.ddp import BucketedDDP

    model, _ = tiny_model(seed=rank)
    launched: list = []
    model.tok_emb.weight.register_post_accumulate_grad_hook(
        lambda p: launched.append([b.work is not None for b in ddp.buckets]))
    ddp = BucketedDDP(model, bucket_mb=BUCKET_MB)
    step_model = model
    if name == "compiled_blocks":
        for block in model.blocks:
            block.compile(backend="aot_eager")
    else:
        step_model = torch.compile(model, backend="aot_eager")
    train_steps(step_model, adamw(model), rank, world, ddp, accum=2, zero_grad=ddp.zero_grad)
    save(out, name, rank, params_of(model))
    return {"launched_before_last": launched[1]}  # the synchronized micro-step of step 1


def _all(rank: int, world: int, out: Path, shards: str) -> dict:
    """Both scenario sets in one process group (process start-up is the dominant cost)."""
    return {"equivalence": _equivalence(rank, world, out), "checkpoint": _checkpoint(rank, world, out, shards)}


ROWS_CKPT = 4
SEQ_CKPT = 12


def write_shards(directory: Path) -> Path:
    import numpy as np

    from lmforge.data.shards import ShardWriter

    rng = np.random.default_rng(1)
    for i in range(2):
        with ShardWriter(directory / f"train_{i:03d}", vocab_size=VOCAB, tokenizer_hash="test", bos_id=0) as wr:
            for _ in range(40):
                wr.write([0, *rng.integers(1, VOCAB, size=int(rng.integers(3, 30))).tolist()], documents=1)
    return directory


def make_trainer(shards, run_dir, kind: str | None, per_rank_batch: int, max_steps: int):
    """kind None: the plain single-process Trainer (no parallel object)."""
    from lmforge.data.loader import DocumentPacker, TokenStream
    from lmforge.distributed.parallel import DataParallel, RankSlice
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer, lm_loss

    active = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if active else (0, 1)
    model, mcfg = tiny_model(seed=0, tie_embeddings=False)
    cfg = TrainConfig(batch_size=per_rank_batch, max_steps=max_steps, seq_len=SEQ_CKPT, warmup_steps=1,
                      checkpoint_every=2, keep_checkpoints=5, eval_every=0, log_every=1, progress=False,
                      device="cpu", lr=1e-2, optimizer="adamw")
    make_opt = adamw if kind == "fsdp" else adamw(model)  # FSDP: built over the sharded parameters
    parallel = DataParallel(model, make_opt, kind=kind, bucket_mb=BUCKET_MB) if kind else None
    batches = DocumentPacker(TokenStream(shards), per_rank_batch * world, SEQ_CKPT)
    if kind is None:
        return Trainer(model, adamw(model), batches, lm_loss, cfg, run_dir=run_dir, model_config=mcfg)
    batches = RankSlice(batches, rank, world)
    return Trainer(model, parallel.optimizer, batches, lm_loss, cfg, run_dir=run_dir, model_config=mcfg,
                   parallel=parallel)


def worker(rank: int, world: int, out: str, task: str, *args) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    try:
        info = globals()[f"_{task}"](rank, world, out, *args)
        (out / f"{task}.rank{rank}.json").write_text(json.dumps(info))
    except BaseException:
        (out / f"{task}.rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(task: str, out: Path, world: int = 2, *args) -> list[dict]:
    """Run `_<task>(rank, world, out, *args)` in `world` gloo processes; their JSON results."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.start_processes(worker, args=(world, str(out), task, *args), nprocs=world, join=True,
                           start_method="spawn")
    except Exception as e:
        errors = [p.read_text() for p in sorted(out.glob(f"{task}.rank*.error"))]
        raise AssertionError(f"worker failed: {e}\n" + "\n".join(errors)) from None
    return [json.loads((out / f"{task}.rank{r}.json").read_text()) for r in range(world)]
