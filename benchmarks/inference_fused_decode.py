"""The fused decode-step kernels (lmforge/kernels/decode.py) on a GPU: bf16 correctness, GEMV bandwidth
against cuBLAS, attention against SDPA, and one whole decode step against the compiled engine's.

Per shape (llama124m, llama1b; random bf16 weights):
  check      each kernel against its torch reference in fp32 (rel. error of the kernel and, for
             scale, of torch's own bf16 computation against the same fp32 reference)
  gemv       microseconds per call inside a CUDA graph (no Python launch cost; the graph cycles
             through copies of the weight totalling > 200 MB, so weights stream from memory as
             in a real step, not from the 50 MB L2) and achieved TB/s (weight bytes / time) of
             each fused op and of the plain GEMV (+ residual) kernel, against F.linear (cuBLAS)
             timed the same way, the fraction of the card's peak bandwidth, and the eager time
             (triton.testing.do_bench median, L2 flushed: includes Triton's Python launch cost)
  attention  decode attention of one row at a few cache lengths (key splits chosen by the rule,
             and no split; the broadcast-and-sum kernel and the tl.dot one) against
             F.scaled_dot_product_attention over the same cache slice, all inside CUDA graphs
  step       GPU time per decode step of the engine's captured k-step graph (Engine(compile=True),
             batch 1, 8 steps per replay, timed with CUDA events over replays): the inductor-
             compiled model step (fused_decode=False), the fused step, and the fused step with
             the tl.dot attention (FusedDecoder(attn_impl="dot")) with the split rule and without
             splits, same model, same run

  python benchmarks/inference_fused_decode.py --shape llama124m llama1b --out runs/bench/fused.json

Prints tables and writes JSON. CUDA only.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import INFERENCE_SHAPES

from lmforge.io import write_json

PEAK_TBS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35)]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


ROTATE_BYTES = 200_000_000  # weight copies per timed graph: > the 50 MB L2 of an H100 several times


def graph_us(fn, args: list) -> float:
    """Microseconds per call of fn(a), a in args, captured once each in one CUDA graph (no launch
    cost from Python) and replayed 10 times; first run outside the graph (autotuning, handles)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for a in args:
            fn(a)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in args:
            fn(a)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * len(args))


def kernel_rows(shape: str, M: int, peak: float, check_only: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    from lmforge.kernels import decode as kd
    from lmforge.model import ModelConfig
    from lmforge.model.positions import rope_cos_sin

    cfg = ModelConfig(**INFERENCE_SHAPES[shape])
    d, Hq, Hkv, D, ff, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, device=dev))
    S = 2048
    x, nw = r(M, d).to(bf), (1 + r(d, scale=0.1)).to(bf)
    w_qkv, w_o = r((Hq + 2 * Hkv) * D, d, scale=d ** -0.5).to(bf), r(d, Hq * D, scale=(Hq * D) ** -0.5).to(bf)
    w_gu, w_down = r(2 * ff, d, scale=d ** -0.5).to(bf), r(d, ff, scale=ff ** -0.5).to(bf)
    w_head = r(V, d, scale=d ** -0.5).to(bf)
    cos, sin = rope_cos_sin(torch.arange(S, device=dev), D, cfg.rope_theta)
    pos = torch.randint(100, 1000, (M,), device=dev)
    kc, vc = r(M, Hkv, S, D).to(bf), r(M, Hkv, S, D).to(bf)
    q = torch.empty(M, Hq, D, dtype=bf, device=dev)
    y, h = r(M, Hq * D).to(bf), r(M, ff).to(bf)
    f32 = lambda t: t.float()

    # -- correctness in bf16 against fp32 references
    checks = []
    kc2, vc2 = kc.float(), vc.float()
    got_q = kd.norm_qkv_rope(x, nw, 1e-5, w_qkv, cos, sin, pos, kc, vc, Hq, q).clone()
    want_q = kd.norm_qkv_rope_ref(f32(x), f32(nw), 1e-5, f32(w_qkv), cos, sin, pos, kc2, vc2, Hq)
    rows = torch.arange(M, device=dev)
    torch_q = kd.norm_qkv_rope_ref(x, nw, 1e-5, w_qkv, cos, sin, pos, kc.clone(), vc.clone(), Hq)
    checks.append(("norm_qkv_rope q", rel(got_q, want_q), rel(torch_q, want_q)))
    checks.append(("norm_qkv_rope k cache", rel(kc[rows, :, pos], kc2[rows, :, pos]), None))
    want = kd.decode_attention_ref(f32(q), f32(kc), f32(vc), pos)
    torch_attn = rel(kd.decode_attention_ref(q, kc, vc, pos), want)
    for impl in ("head", "dot", "sum"):
        for splits in (1, 8):
            for _ in range(2):  # twice: the split counters must have been reset by the first call
                out = torch.full((M, Hq * D), float("nan"), dtype=bf, device=dev)
                kd.decode_attention(q, kc, vc, pos, out, 1024, impl=impl, splits=splits)
            checks.append((f"decode_attention {impl} splits={splits}", rel(out, want), torch_attn))
    wrong = 0  # rows whose fused argmax differs from torch.argmax of the kernel's own logits (5 calls)
    for _ in range(5):
        tok, lg = torch.full((M,), -1, device=dev), torch.empty(M, V, device=dev)
        kd.norm_gemv(x, nw, 1e-5, r(V, d, scale=d ** -0.5).to(bf), lg, tok)
        wrong += int((tok != lg.argmax(-1)).sum())
    checks.append(("head argmax: rows != torch", float(wrong), None))
    out = kd.gemv_residual(y, w_o, x, torch.empty_like(x))
    checks.append(("gemv_residual (o)", rel(out, kd.gemv_residual_ref(f32(y), f32(w_o), f32(x))),
                   rel(kd.gemv_residual_ref(y, w_o, x), kd.gemv_residual_ref(f32(y), f32(w_o), f32(x)))))
    out = kd.norm_swiglu(x, nw, 1e-5, w_gu, torch.empty(M, ff, dtype=bf, device=dev))
    want = kd.norm_swiglu_ref(f32(x), f32(nw), 1e-5, f32(w_gu))
    checks.append(("norm_swiglu", rel(out, want), rel(kd.norm_swiglu_ref(x, nw, 1e-5, w_gu), want)))
    out = kd.norm_gemv(x, nw, 1e-5, w_head, torch.empty(M, V, dtype=bf, device=dev))
    want = kd.norm_gemv_ref(f32(x), f32(nw), 1e-5, f32(w_head))
    checks.append(("norm_gemv (head)", rel(out, want), rel(kd.norm_gemv_ref(x, nw, 1e-5, w_head), want)))
    check_rows = [{"shape": shape, "rows": M, "kernel": n, "rel_err": e, "torch_bf16_rel_err": t} for n, e, t in checks]

    if check_only:
        return check_rows, [], []

    # -- GEMVs against cuBLAS on the same weights
    gemv = []
    xo, hq = torch.empty_like(x), torch.empty(M, ff, dtype=bf, device=dev)
    logits = torch.empty(M, V, dtype=bf, device=dev)
    cases = [
        ("qkv: norm+GEMV+RoPE+cache", w_qkv, lambda w: kd.norm_qkv_rope(x, nw, 1e-5, w, cos, sin, pos, kc, vc, Hq, q),
         lambda w: F.linear(x, w)),
        ("o: GEMV+residual", w_o, lambda w: kd.gemv_residual(y, w, x, xo), lambda w: F.linear(y, w)),
        ("gate/up: norm+GEMV+SwiGLU", w_gu, lambda w: kd.norm_swiglu(x, nw, 1e-5, w, hq), lambda w: F.linear(x, w)),
        ("down: GEMV+residual", w_down, lambda w: kd.gemv_residual(h, w, x, xo), lambda w: F.linear(h, w)),
        ("head: norm+GEMV", w_head, lambda w: kd.norm_gemv(x, nw, 1e-5, w, logits), lambda w: F.linear(x, w)),
    ]
    for label, w in (("qkv", w_qkv), ("gate/up", w_gu)):  # the GEMV alone (+ a residual of zeros)
        zero, res = x.new_zeros(M, w.shape[0]), x.new_empty(M, w.shape[0])
        cases.append((f"plain GEMV ({label} weight)", w, lambda w, zero=zero, res=res: kd.gemv_residual(x, w, zero, res),
                      lambda w: F.linear(x, w)))
    for name, w, mine, cublas in cases:
        nbytes = w.numel() * w.element_size()
        # copies of the weight, used in turn, so that they stream from memory as in a real step
        copies = [w] + [w.clone() for _ in range(min(255, max(1, -(-ROTATE_BYTES // nbytes) - 1)))]
        t_mine, t_cublas = graph_us(mine, copies), graph_us(cublas, copies)
        t_eager = bench_us(lambda mine=mine, w=w: mine(w))
        gemv.append({"shape": shape, "rows": M, "op": name, "N": w.shape[0], "K": w.shape[1], "mb": nbytes / 1e6,
                     "us": t_mine, "tbs": nbytes / t_mine / 1e6, "cublas_us": t_cublas, "eager_us": t_eager,
                     "cublas_tbs": nbytes / t_cublas / 1e6, "speedup": t_cublas / t_mine, "of_peak": nbytes / t_mine / 1e6 / peak})
        del copies

    # -- decode attention against SDPA (in graphs too; one cache, L2-resident at these lengths)
    out = torch.empty(M, Hq * D, dtype=bf, device=dev)
    qq = q.view(M, Hq, 1, D)

    def attn_row(L: int) -> dict:
        p = torch.full((M,), L - 1, device=dev)
        reps = [None] * 20
        sdpa = lambda _: F.scaled_dot_product_attention(qq, kc[:, :, :L], vc[:, :, :L], enable_gqa=Hq != Hkv)
        row = {"shape": shape, "rows": M, "length": L, "sdpa_us": graph_us(sdpa, reps)}
        for name, kw in (("tuned", {}), ("head", dict(impl="head")), ("head_nosplit", dict(impl="head", splits=1)),
                         ("dot", dict(impl="dot")), ("sum", dict(impl="sum", splits=kd.attention_splits(M, Hkv, L)))):
            row[f"{name}_us"] = graph_us(lambda _, kw=kw: kd.decode_attention(q, kc, vc, p, out, L, **kw), reps)
            if name in ("tuned", "head", "dot"):
                key = (M, Hq, Hkv, D, kd.tuning_length(L), bf, kw.get("impl"), None, None, q.device)
                row[f"{name}_config"] = kd.attention_choices.get(key)
        return row

    attn = [attn_row(L) for L in (160, 1024)]
    return check_rows, gemv, attn


def step_rows(shape: str, rows_list: list[int], variants: list[str]) -> list[dict]:
    """GPU time per decode step of the engine's captured 8-step graph at each batch size: the
    inductor-compiled model step and the fused step (attention tuned per shape, or fixed)."""
    from lmforge.inference import Engine, SamplingParams
    from lmforge.inference.fused_decode import FusedDecoder
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(**INFERENCE_SHAPES[shape], attention_backend="sdpa", tie_embeddings=False)
    with torch.device("cuda"):  # initialised on the GPU: a 1.1B model's CPU init took > 100 s
        model = Transformer(cfg).to(torch.bfloat16).eval()
    emb = model.tok_emb.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - (emb.shape[0] - 1) * emb.shape[1] * 2
    out = []
    for M in rows_list:
        prompts = [torch.randint(0, cfg.vocab_size, (32,)).tolist() for _ in range(M)]
        rows, tokens = [], {}
        for variant in variants:
            fused = variant != "compiled"
            engine = Engine(model, max_batch=M, max_len=256, eos_ids=[], compile=True, fused_decode=fused)
            assert (engine.fused is not None) == fused, variant
            if variant in ("fused_head", "fused_dot", "fused_sum"):  # one attention kernel, splits tuned
                engine.fused = FusedDecoder(model, engine.cache, attn_impl=variant.split("_")[1])
            res = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))  # compile, tune, capture
            tokens[variant] = [t for o in res for t in o[0].token_ids]
            (graph,) = [g for g in engine.graphs.graphs.values() if g is not None]
            engine.bufs.positions.fill_(32)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(20):  # 160 steps, positions 40..200
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) * 1e3 / (20 * engine.decode_steps)
            rows.append({"shape": shape, "rows": M, "variant": variant, "us_per_step": us, "tokens_per_s": M * 1e6 / us,
                         "weight_tbs": weight_bytes / us / 1e6})
            del engine
        first = tokens[variants[0]]
        for r in rows:
            same = sum(a == b for a, b in zip(first, tokens[r["variant"]]))
            r[f"greedy_tokens_same_as_{variants[0]}"] = f"{same}/{len(first)}"
        out += rows
        print_tables([], [], [], rows)
    return out


def print_tables(checks, gemv, attn, steps) -> None:
    if checks:
        print(f"\n{'shape':<10} {'rows':>4} {'kernel':<28} {'rel err':>9} {'torch bf16':>10}")
    for r in checks:
        t = r["torch_bf16_rel_err"]
        print(f"{r['shape']:<10} {r['rows']:>4} {r['kernel']:<28} {r['rel_err']:>9.2e} "
              f"{'-' if t is None else format(t, '.2e'):>10}")
    if gemv:
        print(f"\n{'shape':<10} {'rows':>4} {'op':<28} {'MB':>6} {'us':>7} {'TB/s':>6} {'peak':>6} {'cuBLAS us':>9} "
              f"{'TB/s':>6} {'x cuBLAS':>8} {'eager us':>8}")
    for r in gemv:
        print(f"{r['shape']:<10} {r['rows']:>4} {r['op']:<28} {r['mb']:>6.1f} {r['us']:>7.1f} {r['tbs']:>6.2f} "
              f"{r['of_peak']:>6.1%} {r['cublas_us']:>9.1f} {r['cublas_tbs']:>6.2f} {r['speedup']:>8.2f} {r['eager_us']:>8.1f}")
    if attn:
        print(f"\n{'shape':<10} {'rows':>4} {'length':>6} {'tuned us':>8} {'head':>6} {'1 split':>7} {'dot':>6} "
              f"{'sum':>6} {'SDPA':>6}  tuned config")
    for r in attn:
        print(f"{r['shape']:<10} {r['rows']:>4} {r['length']:>6} {r['tuned_us']:>8.1f} {r['head_us']:>6.1f} "
              f"{r['head_nosplit_us']:>7.1f} {r['dot_us']:>6.1f} {r['sum_us']:>6.1f} {r['sdpa_us']:>6.1f}  "
              f"{r['tuned_config']}")
    if steps:
        print(f"\n{'shape':<10} {'rows':>4} {'step':<17} {'us/step':>8} {'tok/s':>8} {'TB/s':>5}  greedy same as first")
    for r in steps:
        same = next(v for k, v in r.items() if k.startswith("greedy_tokens_same"))
        print(f"{r['shape']:<10} {r['rows']:>4} {r['variant']:<17} {r['us_per_step']:>8.1f} {r['tokens_per_s']:>8.0f} "
              f"{r['weight_tbs']:>5.2f}  {same}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama124m", "llama1b"], choices=sorted(INFERENCE_SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="batch rows for the kernel timings")
    ap.add_argument("--no-step", action="store_true", help="skip the whole-step comparison")
    ap.add_argument("--no-kernels", action="store_true", help="only the whole-step comparison")
    ap.add_argument("--check-only", action="store_true", help="only the bf16 checks of the kernels (no timings)")
    ap.add_argument("--step-rows", type=int, nargs="+", default=[1], help="batch rows for the step timings")
    ap.add_argument("--step-variants", nargs="+", default=["compiled", "fused", "fused_head", "fused_dot"],
                    choices=["compiled", "fused", "fused_head", "fused_dot", "fused_sum"])
    ap.add_argument("--out", default="runs/bench/inference_fused_decode.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("inference_fused_decode.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    peak = next((t for k, t in PEAK_TBS if k in name), 3.35)
    checks, gemv, attn, steps = [], [], [], []
    for shape in args.shape:  # tables printed per shape, JSON rewritten after each (a timeout keeps them)
        for M in [] if args.no_kernels else args.rows:
            c, g, a = kernel_rows(shape, M, peak, args.check_only)
            checks += c
            gemv += g
            attn += a
            print_tables(c, g, a, [])
            write_json(Path(args.out), {"device": name, "partial": True, "checks": checks, "gemv": gemv, "attention": attn})
        if not args.no_step:
            steps += step_rows(shape, args.step_rows, args.step_variants)
        write_json(Path(args.out), {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                                    "command": " ".join(sys.argv), "peak_tbs": peak, "checks": checks, "gemv": gemv,
                                    "attention": attn, "step": steps})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
