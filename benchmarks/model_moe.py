"""MoE layer vs a dense MLP of equal active FLOPs: forward+backward time, and a correctness check.

The dense baseline is `layers.MLP` (SwiGLU) of width top_k·d_expert, so per token it does the same
matmul FLOPs as the k routed experts (the router adds 2·d_model·n_experts, ~1%, counted against
the MoE). Variants timed in the same run, on the same inputs:
  dense         layers.MLP
  moe           MoE, dispatch "grouped_mm" (torch._grouped_mm) where available, else "loop"
  moe_loop      MoE, dispatch "loop" (a matmul per expert on contiguous slices)
  experts_only  the grouped expert FFN alone on pre-sorted tokens: how much of `moe` is routing,
                sorting, gathering and combining (diagnostic)
Before timing it checks the MoE output against `moe_reference` (every expert on every token, fp32)
on a slice of tokens, and grouped_mm against loop on the whole batch.

  python benchmarks/model_moe.py                 # CPU, CI-sized shapes
  python benchmarks/model_moe.py --shapes gpu    # on a GPU: d_model 1024/2048, 64 experts top-8

Prints a table and writes JSON (--out, default runs/bench/model_moe_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from common import median_ms

from lmforge.io import write_json
from lmforge.model.layers import MLP
from lmforge.model.moe import MoE, MoEConfig, moe_reference

# (d_model, n_experts, top_k, d_expert, tokens)
SHAPES = {
    "cpu": [(96, 16, 4, 64, 768), (192, 32, 4, 128, 1024)],
    # fine-grained: the dense SwiGLU width (8/3·d rounded to 64) split 8 ways, 64 experts, top-8
    "gpu": [(1024, 64, 8, 344, 16384), (2048, 64, 8, 688, 16384), (2048, 64, 8, 688, 32768)],
}




def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd(module, inputs, grads, params, moe: bool, backward: bool = True):
    """A closure running forward (+ backward of <y, g> plus the aux losses) on rotating inputs."""
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(inputs)
        out = module(inputs[i])
        y, aux = (out[0], out[1]) if moe else (out, {})
        if backward:
            for p in params:
                p.grad = None
            loss = (y * grads[i]).sum() + sum(aux.values())
            loss.backward()

    return run


def bench_shape(d, e, k, f, n, device, dtype, iters, warmup, profile=False) -> dict:
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=e, top_k=k, d_expert=f, balance_loss_coef=0.01)
    moe = MoE(d, cfg, "silu", True).to(device=device, dtype=dtype)
    dense = MLP(d, k * f, "silu", True).to(device)
    for lin in (dense.gate, dense.up, dense.down):
        lin.reset_parameters(0.02)
    dense = dense.to(dtype)
    dense.act = torch.nn.functional.silu  # the fused kernel, as the MoE uses: the strongest dense MLP
    b, t = n // 2048 or 1, min(n, 2048)
    inputs = [torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    grads = [torch.randn(b, t, d, device=device, dtype=dtype) for _ in range(3)]
    row: dict = {"d_model": d, "n_experts": e, "top_k": k, "d_expert": f, "tokens": b * t,
                 "dense_d_ff": k * f, "dtype": str(dtype).replace("torch.", "")}

    # correctness: against the fp32 every-expert reference on a slice, and grouped_mm vs loop
    ref_moe = MoE(d, cfg, "silu", True).to(device)
    ref_moe.load_state_dict({k_: v.float() for k_, v in moe.state_dict().items()})
    x_small = inputs[0][:1, :256].detach()
    with torch.no_grad():
        row["err_vs_reference"] = rel_err(moe(x_small)[0], moe_reference(ref_moe, x_small.float()))
    mode = moe.dispatch_mode(inputs[0])
    row["dispatch"] = mode
    if mode == "grouped_mm":
        x = inputs[0].detach().requires_grad_(True)
        y_g = moe(x)[0]
        (gx_g,) = torch.autograd.grad(y_g, x, grads[0])
        moe.cfg.dispatch = "loop"
        y_l = moe(x)[0]
        (gx_l,) = torch.autograd.grad(y_l, x, grads[0])
        moe.cfg.dispatch = "auto"
        row["err_grouped_vs_loop"] = rel_err(y_g, y_l)
        row["err_grouped_vs_loop_grad"] = rel_err(gx_g, gx_l)

    dense_params, moe_params = list(dense.parameters()), list(moe.parameters())
    ms = {}
    ms["dense"] = median_ms(fwd_bwd(dense, inputs, grads, dense_params, False), device, iters=iters, warmup=warmup, cpu_clock="process")
    ms["moe"] = median_ms(fwd_bwd(moe, inputs, grads, moe_params, True), device, iters=iters, warmup=warmup, cpu_clock="process")
    with torch.no_grad():
        ms["dense_fwd"] = median_ms(fwd_bwd(dense, inputs, grads, dense_params, False, False), device, iters=iters, warmup=warmup, cpu_clock="process")
        ms["moe_fwd"] = median_ms(fwd_bwd(moe, inputs, grads, moe_params, True, False), device, iters=iters, warmup=warmup, cpu_clock="process")
    moe.cfg.dispatch = "loop"
    ms["moe_loop"] = median_ms(fwd_bwd(moe, inputs, grads, moe_params, True), device, iters=max(3, iters // 4), warmup=1, cpu_clock="process")
    moe.cfg.dispatch = "auto"

    # the expert FFN alone, on tokens already sorted by expert with this batch's real routing
    with torch.no_grad():
        flat = inputs[0].reshape(-1, d)
        idx = moe.router_logits(flat).topk(k, dim=-1).indices.reshape(-1)
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=e)  # (setup only)
    xs = flat.detach().index_select(0, order // k).requires_grad_(True)
    gs = torch.randn_like(xs)
    gates = torch.rand(xs.shape[0], device=device)

    def experts_only():
        for p in moe_params:
            p.grad = None
        xs.grad = None
        moe.experts(xs, counts, gates).backward(gs)

    ms["experts_only"] = median_ms(experts_only, device, iters=iters, warmup=warmup, cpu_clock="process")
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        run = fwd_bwd(moe, inputs, grads, moe_params, True)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(f"profile of 5 moe fwd+bwd, d={d} tokens={b * t}:\n{table}", flush=True)
    row["ms"] = ms
    row["ratio_moe_vs_dense"] = ms["moe"] / ms["dense"]
    row["ratio_fwd_moe_vs_dense"] = ms["moe_fwd"] / ms["dense_fwd"]
    row["ratio_experts_only_vs_dense"] = ms["experts_only"] / ms["dense"]
    flops = 3 * 2 * 3 * (b * t) * d * (k * f)  # fwd + bwd (2x) of three matmuls
    row["dense_tflops"] = flops / (ms["dense"] * 1e-3) / 1e12
    row["expert_load_max_over_uniform"] = (counts.max().item() * e) / (b * t * k)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: gpu on CUDA, else cpu")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the MoE per shape")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or ("gpu" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    iters = args.iters or (20 if device.type == "cuda" else 5)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for d, e, k, f, n in SHAPES[shapes]:
        try:
            r = bench_shape(d, e, k, f, n, device, dtype, iters, warmup=3, profile=args.profile)
        except Exception as err:  # report the shape that failed and go on with the others
            print(f"d={d} E={e} k={k} d_expert={f} tokens={n}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        rows.append(r)
        print(f"d={d} E={e} k={k} d_expert={f} tokens={r['tokens']} dispatch={r['dispatch']} "
              f"err_ref={r['err_vs_reference']:.2e} err_g/l={r.get('err_grouped_vs_loop', float('nan')):.2e} "
              f"grad_g/l={r.get('err_grouped_vs_loop_grad', float('nan')):.2e}", flush=True)
    if not rows:
        raise SystemExit("every shape failed")
    clock = "device" if device.type == "cuda" else "1-thread CPU-time"
    print(f"\n{name}, {rows[0]['dtype']}, fwd+bwd {clock} milliseconds (median of {iters})")
    print(f"{'shape':<28}{'dense':>9}{'moe':>9}{'ratio':>7}{'fwd ratio':>10}{'loop':>9}{'experts':>9}"
          f"{'exp/dense':>10}{'dense TF/s':>11}")
    for r in rows:
        ms = r["ms"]
        shape = f"d{r['d_model']} E{r['n_experts']}k{r['top_k']} N{r['tokens']}"
        print(f"{shape:<28}{ms['dense']:>9.3f}{ms['moe']:>9.3f}{r['ratio_moe_vs_dense']:>7.2f}"
              f"{r['ratio_fwd_moe_vs_dense']:>10.2f}{ms['moe_loop']:>9.3f}{ms['experts_only']:>9.3f}"
              f"{r['ratio_experts_only_vs_dense']:>10.2f}{r['dense_tflops']:>11.1f}")
    out = Path(args.out or f"runs/bench/model_moe_{device.type}.json")
    write_json(out, {"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
                     "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
