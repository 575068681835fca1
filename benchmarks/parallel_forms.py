"""Model parallelism on 2 GPUs: tensor, pipeline, context (ring) and expert parallelism against data
parallelism on the same model, in one command and one table.

Written for `nvidia-h100-x2` (NOT yet run there: no device time was left this session):
    python benchmarks/parallel_forms.py --out bench_parallel.json
It starts torchrun itself (2 processes per form; 1 process for single-GPU baselines) with the same
model, batch and step count, and reports per form: tokens/s per GPU, step time, peak memory per GPU,
plus the form's own number:
  dp      torch DistributedDataParallel (the strongest data-parallel baseline), global batch 2 × B
  tp      apply_tp with sequence parallelism, global batch B per TP group (TP splits the model,
          not the batch); also `tp_layer`: one wide MLP layer forward+backward, 1 GPU vs TP on 2
  pp      PipelineStage + run_pipeline, GPipe and 1F1B, global batch 2 × B in m micro-batches
          (m must divide 2 × B): measured bubble
          (1 − busy/wall on each stage) next to (p − 1)/(m + p − 1)
  cp      ring attention (fwd+bwd) at a context whose full attention-score matrices do not fit one
          80 GB GPU (`cp_reference`: the same block math on 1 GPU, expected out of memory), against
          single-GPU SDPA (flash, O(T) memory) at the same context; our ring blocks are the readable
          fp32 reference (O(T_local²) per block), so SDPA is expected to win on speed
  ep      one MoE layer: expert parallel (all-to-all) vs every GPU holding every expert (DP), and
          the share of the EP step spent in the all-to-alls (timed with device syncs around them)
`--smoke` runs tiny shapes on CPU with gloo (checks the script; the pp bubble is still meaningful
as a measurement of the schedule on this machine, the rest is not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

FORMS = ["dp", "tp", "tp_layer", "pp", "cp", "ep"]


def _cfg(args):
    from lmforge.model import ModelConfig

    if args.smoke:
        return ModelConfig(vocab_size=211, context_length=args.seq, d_model=192, n_layers=4, n_heads=6,
                           d_ff=512, attention_backend="sdpa")
    return ModelConfig(vocab_size=50304, context_length=args.seq, d_model=4096, n_layers=8, n_heads=32,
                       n_kv_heads=8, attention_backend="sdpa")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def _timed(step, args, device, after_warmup=None) -> float:
    """Mean seconds per call of `step` after warm-up."""
    for _ in range(args.warmup):
        step()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / args.steps


def _batch(args, rows, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _cfg(args).vocab_size, (rows, args.seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def run_form(args, device, rank, world) -> dict:
    from lmforge.model import Transformer

    form = args.form
    cfg = _cfg(args)
    torch.manual_seed(0)
    if form in ("dp", "single"):
        model = Transformer(cfg).to(device)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x, y = _batch(args, args.batch, device, seed=rank)

        def step():
            with _autocast(device):
                loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": args.batch * args.seq / s, "step_ms": 1e3 * s}
    if form == "tp":
        from lmforge.distributed.tensor_parallel import apply_tp, sync_tp_grads

        model = apply_tp(Transformer(cfg).to(device), sequence_parallel=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x, y = _batch(args, args.batch, device)  # the same batch on both TP ranks

        def step():
            with _autocast(device):
                loss = model(x, y).loss
            loss.backward()
            sync_tp_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": args.batch * args.seq / s / world, "step_ms": 1e3 * s}
    if form == "tp_layer":  # one wide MLP (column- then row-parallel) on a long token batch
        from lmforge.distributed.tensor_parallel import RowParallelLinear, _CopyIn, _shard_rows
        from lmforge.model.layers import MLP

        d, f = (cfg.d_model, 4 * cfg.d_model)
        mlp = MLP(d, f).to(device)
        for lin in (mlp.gate, mlp.up, mlp.down):
            lin.reset_parameters(0.02)
        if world > 1:
            rows = torch.arange(rank * f // world, (rank + 1) * f // world)
            _shard_rows(mlp.gate, rows)
            _shard_rows(mlp.up, rows)
            mlp.down = RowParallelLinear(mlp.down, None, sequence_parallel=False)
        x = torch.randn(args.batch * args.seq, d, device=device, requires_grad=True)

        def step():
            with _autocast(device):
                h = _CopyIn.apply(x, None) if world > 1 else x
                mlp(h).float().square().mean().backward()

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": args.batch * args.seq / s / world, "step_ms": 1e3 * s}
    if form.startswith("pp"):
        from lmforge.distributed.pipeline import PipelineStage, bubble_formula, run_pipeline

        schedule = form.split("_")[1]
        stage = PipelineStage(Transformer(cfg).to(device), rank, world)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-4, fused=device.type == "cuda")
        rows = world * args.batch  # the global batch of the dp row: both GPUs' sequences
        x, y = _batch(args, rows, device)
        results = []

        def step():
            with _autocast(device):
                results.append(run_pipeline(stage, x, y, args.micro, schedule))
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = _timed(step, args, device)
        bubbles = [r.bubble for r in results[args.warmup:]]
        return {"tokens_per_s_per_gpu": rows * args.seq / s / world, "step_ms": 1e3 * s,
                "bubble": sum(bubbles) / len(bubbles), "bubble_formula": bubble_formula(world, args.micro)}
    if form in ("cp", "cp_single", "cp_reference"):
        from lmforge.distributed.ring_attention import block_forward, ring_attention

        T, H, D = args.cp_seq, 8, 128
        t_local = T // world
        g = torch.Generator(device=device).manual_seed(rank)
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        q, k, v = (torch.randn(1, H, t_local, D, device=device, dtype=dt, generator=g).requires_grad_()
                   for _ in range(3))

        def step():
            if form == "cp":
                out = ring_attention(q, k, v, causal=True)
            elif form == "cp_reference":  # the ring's block math on the whole sequence, one GPU
                out = block_forward(q, k, v, D ** -0.5, True)[0]
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.float().sum().backward()

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": T / s / world, "step_ms": 1e3 * s, "context": T}
    if form in ("ep", "ep_dp"):
        from lmforge.distributed.expert_parallel import ExpertParallelMoE
        from lmforge.model.moe import MoE, MoEConfig

        mcfg = MoEConfig(n_experts=args.experts, top_k=2, d_expert=cfg.d_model // 2)
        moe = MoE(cfg.d_model, mcfg).to(device)
        if form == "ep":
            moe = ExpertParallelMoE.from_moe(moe)
            plain = moe._a2a

            def synced(*a):  # so the all-to-all's time is its own, not the queued kernels before it
                _sync(device)
                out = plain(*a)
                _sync(device)
                return out

            moe._a2a = synced
        elif world > 1:
            moe = torch.nn.parallel.DistributedDataParallel(moe)
        x = torch.randn(args.batch, args.seq, cfg.d_model, device=device, requires_grad=True)

        def step():
            with _autocast(device):
                y, aux, _ = moe(x)
            (y.float().square().mean() + sum(aux.values())).backward()

        inner = moe if form == "ep" else None
        s = _timed(step, args, device, after_warmup=lambda: setattr(inner, "comm_s", 0.0) if inner else None)
        row = {"tokens_per_s_per_gpu": args.batch * args.seq / s, "step_ms": 1e3 * s}
        if inner is not None:
            row["a2a_share"] = inner.comm_s / (args.steps * s)
        return row
    raise SystemExit(f"unknown form {form}")


def worker(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if not args.smoke and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = run_form(args, device, rank, world)
    row.update(form=args.form, world_size=world, peak_mem_gb=_peak_gb(device))
    if rank == 0:
        Path(args.result).write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def launch(args, form: str, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--form", form, "--result", str(result)]
        for key in ("batch", "seq", "steps", "warmup", "micro", "cp_seq", "experts"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--smoke"] if args.smoke else []
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.smoke else None
        proc = subprocess.run(cmd, env=env)
        if proc.returncode:
            return {"form": form, "world_size": nproc, "error": f"failed, exit {proc.returncode} (see its log above; out of memory?)"}
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--form", default="single")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank / pipeline batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=8, help="pipeline micro-batches")
    p.add_argument("--cp-seq", type=int, default=36864,
                   help="ring attention context (whole sequence); 36864: the fp32 score matrices of 8 heads "
                        "need > 80 GB on one GPU, ~11 GB per block on each of 2")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU/gloo")
    p.add_argument("--out", default="bench_parallel.json")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.seq, args.steps, args.warmup, args.cp_seq, args.experts = 64, 3, 1, 512, 4
    forms = [f for f in args.forms.split(",") if f]
    rows = []
    if "dp" in forms or "tp" in forms:
        rows.append({**launch(args, "single", 1), "form": "single"})
    for form in forms:
        if form == "pp":
            rows += [launch(args, "pp_gpipe", 2), launch(args, "pp_1f1b", 2)]
        elif form == "cp":
            rows += [launch(args, "cp_single", 1), launch(args, "cp_reference", 1), launch(args, "cp", 2)]
        elif form == "ep":
            rows += [launch(args, "ep_dp", 2), launch(args, "ep", 2)]
        elif form == "tp_layer":
            rows += [{**launch(args, "tp_layer", 1), "form": "tp_layer (1 GPU)"}, launch(args, "tp_layer", 2)]
        else:
            rows.append(launch(args, form, 2))
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    print(f"device: {device}; batch {args.batch} x {args.seq}, {args.steps} timed steps")
    print(f"{'form':<18} {'GPUs':>4} {'tok/s/GPU':>11} {'step ms':>9} {'peak GB':>8}  extra")
    for r in rows:
        if "error" in r:
            print(f"{r['form']:<18} {r['world_size']:>4}  {r['error']}")
            continue
        extra = {k: round(v, 4) for k, v in r.items() if k in ("bubble", "bubble_formula", "a2a_share", "context")}
        print(f"{r['form']:<18} {r['world_size']:>4} {r['tokens_per_s_per_gpu']:>11.0f} {r['step_ms']:>9.1f} "
              f"{r['peak_mem_gb'] or 0:>8.2f}  {extra or ''}")
    Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
