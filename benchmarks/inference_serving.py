"""Serving: continuous batching vs static batching on the same engine, same request stream.

Requests arrive as a Poisson process (`--rate` per second) with prompt lengths and reply lengths
drawn uniformly (seeded). Both policies use one `Engine` with `--max-batch` slots:
  continuous  a request joins the running batch at the next step after it arrives; finished
              sequences leave at once (the engine's scheduler)
  static      requests wait until the whole running batch has finished, then up to max-batch
              of them start together (what a server without continuous batching does)
  chunked     continuous, with prefill limited to --prefill-chunk tokens per step
Reported: time to first token (TTFT, from arrival), inter-token latency (ITL, mean gap between a
request's tokens), and throughput (generated tokens / wall time), measured in one process; each
policy runs --rounds times in rotating order and the medians are reported. All policies drive the
same Engine object (built and warmed up once), so with --compile (CUDA only: the decode step as a
CUDA graph) they share one compilation. The clients are simulated in the engine's own loop (no
threads, no HTTP): this measures scheduling, not the server's JSON/SSE overhead (that is
inference_serving_http.py; comparing the two separates engine costs from server costs). Also
reported: median engine step time for steps that admitted requests and for the others, and the
median prefill forward (synchronized around it).

  python benchmarks/inference_serving.py                 # CPU, tiny model
  python benchmarks/inference_serving.py --shape gpt2s --requests 256 --rate 50 --max-batch 64 \
      --max-prompt 256 --max-new 128 --compile         # lent GPU

Prints a table and writes JSON (--out, default runs/bench/inference_serving_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import INFERENCE_SHAPES, inference_device, sync

from lmforge.inference import Engine, SamplingParams
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer

SHAPES = {**INFERENCE_SHAPES, "gpt2s": INFERENCE_SHAPES["llama124m"]}  # gpt2s: the name in older commands


def workload(args, vocab: int):
    g = torch.Generator().manual_seed(args.seed)
    gaps = torch.empty(args.requests).exponential_(generator=g) / args.rate
    arrivals = torch.cumsum(gaps, 0).tolist()
    plens = torch.randint(8, args.max_prompt + 1, (args.requests,), generator=g).tolist()
    outs = torch.randint(4, args.max_new + 1, (args.requests,), generator=g).tolist()
    return [(t, torch.randint(0, vocab, (p,), generator=g).tolist(), n) for t, p, n in zip(arrivals, plens, outs)]


def med_ms(xs) -> float:
    return 1e3 * statistics.median(xs) if xs else 0.0


def serve(engine: Engine, reqs, policy: str, prefills: list | None = None) -> dict:
    """One run of the workload; `prefills` collects (rows, seconds) of prefill forwards if the
    caller times them (main does)."""
    t0 = time.perf_counter()
    pending = list(enumerate(reqs))
    first, times, arrive = {}, {}, {}
    n_tokens = 0
    steps = []  # (seconds, requests admitted) per engine step
    if prefills is not None:
        prefills.clear()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        if policy == "continuous" or not engine.has_work():
            take = [r for r in pending if r[1][0] <= now]
            if policy == "static":
                take = take[:engine.max_batch]
            for i, (t, ids, n) in take:
                engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0), request_id=str(i))
                arrive[str(i)] = t
            pending = [r for r in pending if r not in take]
        if not engine.has_work():
            time.sleep(max(0.0, pending[0][1][0] - (time.perf_counter() - t0)))
            continue
        ts, waiting = time.perf_counter(), len(engine.waiting)
        events = engine.step()
        steps.append((time.perf_counter() - ts, waiting - len(engine.waiting)))
        for ev in events:
            if ev.token_id is None:
                continue
            stamp = time.perf_counter() - t0
            n_tokens += 1
            first.setdefault(ev.request_id, stamp)
            times.setdefault(ev.request_id, []).append(stamp)
    wall = time.perf_counter() - t0
    ttft = [first[r] - arrive[r] for r in first]
    itl = [statistics.mean(b - a for a, b in zip(ts, ts[1:])) for ts in times.values() if len(ts) > 1]
    return {"policy": policy, "tokens": n_tokens, "wall_s": wall, "throughput_tok_s": n_tokens / wall,
            "ttft_mean_s": statistics.mean(ttft), "ttft_p90_s": statistics.quantiles(ttft, n=10)[-1],
            "itl_mean_s": statistics.mean(itl), "steps": len(steps),
            "admitting_steps": sum(a > 0 for _, a in steps),
            "admitting_step_ms_p50": med_ms([d for d, a in steps if a > 0]),
            "other_step_ms_p50": med_ms([d for d, a in steps if a == 0]),
            "prefill_forwards": len(prefills or []), "prefill_ms_p50": med_ms([d for _, d in prefills or []])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=48)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="runs per policy (medians reported)")
    ap.add_argument("--compile", action="store_true", help="CUDA-graph decode step (ignored on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = inference_device(args.threads)
    model = Transformer(ModelConfig(**SHAPES[args.shape], attention_backend="sdpa")).to(device, dtype).eval()
    reqs = workload(args, model.cfg.vocab_size)
    max_len = args.max_prompt + args.max_new + 1
    eng = Engine(model, max_batch=args.max_batch, max_len=max_len, eos_ids=[],
                 compile=args.compile and device.type == "cuda")
    prefills: list[tuple[int, float]] = []  # (rows, seconds) of every prefill forward, synchronized
    plain_prefill = eng._forward_prefill

    def timed_prefill(ids, *rest):
        sync(device)
        t = time.perf_counter()
        out = plain_prefill(ids, *rest)
        sync(device)
        prefills.append((ids.shape[0], time.perf_counter() - t))
        return out

    eng._forward_prefill = timed_prefill
    warm = [ids for _, ids, _ in reqs[:args.max_batch]]
    for _ in range(2):  # warm-up: allocator, kernels; compiled: compilation, then graph capture
        eng.generate(warm, SamplingParams(max_tokens=8, temperature=0))
    policies = ["static", "continuous", "chunked"]
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for r in range(args.rounds):  # rotate the order: the shared machine's load drifts
        for name in policies[r % 3:] + policies[:r % 3]:
            eng.prefill_chunk = args.prefill_chunk if name == "chunked" else None
            runs[name].append(dict(serve(eng, reqs, "static" if name == "static" else "continuous", prefills),
                                   policy=name))
    rows = [{k: (statistics.median(x[k] for x in runs[p]) if k != "policy" else p) for k in runs[p][0]}
            for p in policies]
    print(f"{'policy':<11} {'tok/s':>8} {'TTFT mean':>10} {'TTFT p90':>9} {'ITL mean':>9} {'admit step':>10} "
          f"{'other step':>10} {'prefill fwd':>11}")
    for r in rows:
        print(f"{r['policy']:<11} {r['throughput_tok_s']:>8.1f} {r['ttft_mean_s']:>9.3f}s {r['ttft_p90_s']:>8.3f}s "
              f"{r['itl_mean_s'] * 1e3:>7.1f}ms {r['admitting_step_ms_p50']:>8.1f}ms {r['other_step_ms_p50']:>8.1f}ms "
              f"{r['prefill_ms_p50']:>9.1f}ms")
    s, c = rows[:2]
    print(f"continuous / static: throughput x{c['throughput_tok_s'] / s['throughput_tok_s']:.2f}, "
          f"mean TTFT x{c['ttft_mean_s'] / s['ttft_mean_s']:.2f}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"runs/bench/inference_serving_{device.type}.json")
    write_json(out, {"device": dev_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "compiled": eng.compiled, "args": vars(args), "command": " ".join(sys.argv),
                     "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
