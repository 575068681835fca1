"""Serving over HTTP: continuous vs static batching, measured by concurrent streaming clients.

The server is `lmforge serve`'s: a random-weight model of --shape is saved as a model directory
(safetensors + model_config.json) with a tokenizer of the model's vocabulary size (byte-level BPE
whose merges spell printable ASCII, so every token decodes to text), loaded back through the same
code as `lmforge serve DIR --ignore-eos --max-batch B [--compile]` (commands._engine), served by
uvicorn on loopback from this process (the app's engine thread + uvicorn's event loop, as `lmforge
serve` runs). The engine is warmed up (compilation, graph capture) before the server starts.

The clients run in a separate process (this script with --role client): asyncio + httpx, one
streaming `POST /v1/completions` per request, sent at Poisson arrival times (--rate per second);
prompts are random token ids of uniform length in [--min-prompt, --max-prompt], replies uniform
in [--min-new, --max-new] tokens (`max_tokens`; with --ignore-eos every reply has exactly that
many, checked through the streamed `usage`). The same seeded workload is sent once per policy:
  continuous  the server's default: a request joins the running batch at the next engine step
  static      `lmforge serve --batching static`: requests wait until the running batch has
              finished, then up to max-batch of them start together
Both policies run on the same server and engine (one compilation): the worker's policy is switched
between runs while it is idle. Reported per policy: TTFT (send -> first streamed token) p50/p90,
TPOT (per request: (last token - first token) / (tokens - 1)) p50/p90, ITL (all gaps between a
request's consecutive streamed chunks) p50/p90, end-to-end latency p50/p90, requests/s and
generated tokens/s (over first send -> last reply). With --compile the engine decodes 8 tokens per
launch, so chunks arrive in bursts: ITL p50 is then ~0 and TPOT is the meaningful per-token time.
Server-side diagnostics per run (printed as each run ends, and in the JSON): engine steps, their
total, median and longest time, steps over 50 ms, steps that admitted requests and their median
time against the others', prefill forwards, the rows they prefilled and their time (synchronized
around each forward), whether prefill still runs compiled, and graphs dynamo compiled during the run.
benchmarks/inference_serving.py measures the scheduler alone (clients simulated in the engine loop).

  python benchmarks/inference_serving_http.py                      # CPU, tiny model
  python benchmarks/inference_serving_http.py --shape llama124m --requests 256 --rate 50 \\
      --max-batch 64 --max-prompt 256 --max-new 128 --compile     # lent GPU

Prints a table and writes JSON (--out, default runs/bench/inference_serving_http_<device>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

POLICIES = ("continuous", "static")


# -- the clients (their own process; no torch) -------------------------------------------------------
def workload(args) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt ids, reply tokens) per request, from --seed alone."""
    rng = random.Random(args.seed)
    t, reqs = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        plen = rng.randint(args.min_prompt, args.max_prompt)
        reqs.append((t, [rng.randrange(args.vocab) for _ in range(plen)], rng.randint(args.min_new, args.max_new)))
    return reqs


async def one_request(client, url: str, t0: float, arrival: float, ids: list[int], n: int) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    sent = time.perf_counter()
    stamps, usage, finish, error = [], None, None, None
    body = {"model": "bench", "prompt": ids, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    d = json.loads(line[6:])
                    if "error" in d:
                        error = d["error"]["message"]
                        break
                    if d.get("usage"):
                        usage = d["usage"]["completion_tokens"]
                    for c in d["choices"]:  # one chunk per generated token
                        stamps.append(time.perf_counter())
                        finish = c["finish_reason"] or finish
    except Exception as e:  # counted as a failed request, not a crash of the whole run
        error = f"{type(e).__name__}: {e}"
    return {"arrival": arrival, "sent": sent - t0, "stamps": [s - t0 for s in stamps], "usage": usage,
            "want": n, "finish": finish, "error": error}


async def drive(args) -> list[dict]:
    import httpx

    reqs = workload(args)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one_request(client, args.url, t0, a, ids, n) for a, ids, n in reqs))


def pct(xs: list[float], q: int) -> float:
    """The q-th percentile (linear interpolation); the value itself for one sample."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["error"] is None and r["stamps"]]
    exact = sum(r["usage"] == r["want"] and r["finish"] == "length" for r in ok)
    ttft = [r["stamps"][0] - r["sent"] for r in ok]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (r["usage"] - 1) for r in ok if r["usage"] and r["usage"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    e2e = [r["stamps"][-1] - r["sent"] for r in ok]
    span = max(r["stamps"][-1] for r in ok) - min(r["sent"] for r in ok)
    tokens = sum(r["usage"] or 0 for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "exact_length": exact,
            "tokens": tokens, "wall_s": span, "req_per_s": len(ok) / span, "tok_per_s": tokens / span,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "tpot_p50_s": pct(tpot, 50),
            "tpot_p90_s": pct(tpot, 90), "itl_p50_s": pct(itl, 50), "itl_p90_s": pct(itl, 90),
            "e2e_p50_s": pct(e2e, 50), "e2e_p90_s": pct(e2e, 90),
            "errors": sorted({r["error"] for r in results if r["error"]})[:5]}


def client_main(args) -> int:
    results = asyncio.run(drive(args))
    Path(args.result).write_text(json.dumps(summarize(results)))
    return 0


# -- the server (this process) -----------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly vocab_size ids (the last is <|endoftext|>): merges
    spell pairs, then triples, of printable ASCII characters, so nearly every token is text."""
    from lmforge.tokenizer import Tokenizer

    chars = list(range(32, 127))
    merges, pair_id = [], {}
    for a in chars:
        for b in chars:
            pair_id[a, b] = 256 + len(merges)
            merges.append((a, b))
    for pid in list(pair_id.values()):
        for c in chars:
            merges.append((pid, c))
    need = vocab_size - 257
    if need < 0:
        raise SystemExit(f"vocabulary {vocab_size} is smaller than 257 (bytes + <|endoftext|>)")
    return Tokenizer.from_merges(merges[:need], special_tokens=["<|endoftext|>"])


def save_model_dir(shape: dict, root: Path) -> Path:
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.checkpoint import save_model
    from lmforge.tokenizer import save_tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape, attention_backend="sdpa"))
    save_model(root / "model", model, model.cfg)
    save_tokenizer(synthetic_tokenizer(model.cfg.vocab_size), root / "model" / "tokenizer", exports=False)
    return root / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(args, url: str, result: Path, **over) -> dict:
    """One client process sending the workload; its summary."""
    a = dict(requests=args.requests, rate=args.rate, seed=args.seed, min_prompt=args.min_prompt,
             max_prompt=args.max_prompt, min_new=args.min_new, max_new=args.max_new)
    a.update(over)
    cmd = [sys.executable, __file__, "--role", "client", "--url", url, "--vocab", str(args.vocab),
           "--result", str(result)] + [x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["bench", "client"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="tiny", help="a benchmarks/common.py INFERENCE_SHAPES name")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=48)
    ap.add_argument("--min-new", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--warm-requests", type=int, default=None, help="requests of the unrecorded HTTP warm-up "
                    "(default: --requests)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per policy, alternating (medians reported)")
    ap.add_argument("--compile", action="store_true", help="CUDA-graph decode (CUDA only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.role == "client":
        return client_main(args)
    args.warm_requests = args.warm_requests or args.requests

    import torch
    import uvicorn
    from common import INFERENCE_SHAPES, inference_device

    from lmforge.inference import SamplingParams
    from lmforge.inference.commands import _engine, register
    from lmforge.inference.server import create_app
    from lmforge.io import write_json

    if args.shape not in INFERENCE_SHAPES:
        raise SystemExit(f"--shape {args.shape!r}: one of {', '.join(INFERENCE_SHAPES)}")
    device, dtype = inference_device(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge_serving_"))
    model_dir = save_model_dir(INFERENCE_SHAPES[args.shape], tmp)
    args.vocab = INFERENCE_SHAPES[args.shape]["vocab_size"]
    max_len = args.max_prompt + args.max_new + 1
    cli = argparse.ArgumentParser()
    register(cli.add_subparsers(dest="cmd"))
    sargs = cli.parse_args(["serve", str(model_dir), "--device", device.type, "--max-batch", str(args.max_batch),
                            "--max-len", str(max_len), "--max-queue", str(args.requests), "--ignore-eos"]
                           + (["--compile"] if args.compile else []))
    engine, tok, name = _engine(sargs)
    t = time.perf_counter()
    rng = random.Random(args.seed + 1)  # warm-up: compilation, graph capture for every attended length
    warm = [[rng.randrange(args.vocab) for _ in range(n)]
            for n in [args.max_prompt] + [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.max_batch - 1)]]
    engine.generate(warm[:1], SamplingParams(max_tokens=args.max_new, temperature=0))
    engine.generate(warm, SamplingParams(max_tokens=args.max_new, temperature=0))
    warm_s = time.perf_counter() - t
    app = create_app(engine, tok, model_name=name, max_queue=sargs.max_queue)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    worker = app.state.worker
    result = tmp / "result.json"
    steps: list[tuple[float, int]] = []  # (seconds, requests admitted) of every engine step: diagnostics
    plain_step = engine.step

    def timed_step():
        t, waiting = time.perf_counter(), len(engine.waiting)
        events = plain_step()
        steps.append((time.perf_counter() - t, waiting - len(engine.waiting)))
        return events

    def med_ms(xs):
        return 1e3 * statistics.median(xs) if xs else 0.0

    engine.step = timed_step
    prefills: list[tuple[int, float]] = []  # (rows, seconds) of every prefill forward
    plain_prefill = engine._forward_prefill
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def counted_prefill(ids, *rest):
        sync()  # the admitting step waits for the device right after (sampling) anyway
        t = time.perf_counter()
        out = plain_prefill(ids, *rest)
        sync()
        prefills.append((ids.shape[0], time.perf_counter() - t))
        return out

    engine._forward_prefill = counted_prefill
    from torch._dynamo.utils import counters

    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    runs: dict[str, list[dict]] = {p: [] for p in args.policies}
    # the whole workload once through HTTP with continuous batching, not recorded: connections,
    # JSON/SSE, and whatever the engine compiles or captures for admissions into busy batches
    phases = [("warm-up", "continuous", args.warm_requests)] + [
        (p, p, args.requests) for r in range(args.rounds)  # alternate the order: the machine's load drifts
        for p in (args.policies if r % 2 == 0 else list(reversed(args.policies)))]
    for label, policy, n in phases:
        while engine.has_work() or worker.n_held:
            time.sleep(0.05)
        worker.batching = policy
        steps.clear()
        prefills.clear()
        g0, t0 = graphs(), time.perf_counter()
        x = run_clients(args, url, result, requests=n)
        secs = sorted(d for d, _ in steps)
        x["server"] = {"phase_s": time.perf_counter() - t0, "steps": len(secs), "step_s_total": sum(secs),
                       "step_ms_p50": med_ms(secs), "step_ms_max": 1e3 * max(secs, default=0.0),
                       "steps_over_50ms": sum(d > 0.05 for d in secs),
                       "admitting_steps": sum(a > 0 for _, a in steps),
                       "admitting_step_ms_p50": med_ms([d for d, a in steps if a > 0]),
                       "other_step_ms_p50": med_ms([d for d, a in steps if a == 0]),
                       "prefill_forwards": len(prefills), "prefill_rows": sum(r for r, _ in prefills),
                       "prefill_ms_p50": med_ms([d for _, d in prefills]),
                       "prefill_s_total": sum(d for _, d in prefills),
                       "prefill_compiled": engine._prefill_fn is not None, "new_graphs": graphs() - g0}
        print(f"[{label}] {n} requests: {x['tok_per_s']:.0f} tok/s, TTFT p50 {x['ttft_p50_s'] * 1e3:.1f} ms, TPOT p50 "
              f"{x['tpot_p50_s'] * 1e3:.2f} ms, failed {x['failed']}; server: "
              + ", ".join(f"{k} {v:.3g}" for k, v in x["server"].items()), flush=True)
        if label != "warm-up":
            runs[policy].append(x)
    server.should_exit = True
    thread.join(timeout=10)
    keys = [k for k in runs[args.policies[0]][0] if k not in ("errors", "server")]
    rows = [dict({k: statistics.median(x[k] for x in runs[p]) for k in keys}, policy=p,
                 errors=sorted({e for x in runs[p] for e in x["errors"]}), runs=runs[p]) for p in args.policies]
    print(f"{args.shape}, {device.type}, compiled {engine.compiled}, max batch {args.max_batch}, {args.requests} "
          f"requests at {args.rate}/s, prompts {args.min_prompt}-{args.max_prompt}, replies {args.min_new}-"
          f"{args.max_new}; warm-up {warm_s:.1f}s")
    print(f"{'policy':<11} {'req/s':>6} {'tok/s':>8} {'TTFT p50':>9} {'p90':>7} {'TPOT p50':>9} {'p90':>7} "
          f"{'ITL p50':>8} {'p90':>7} {'e2e p50':>8} {'p90':>7} {'exact':>6} {'fail':>4}")
    for x in rows:
        ms = {k: v * 1e3 for k, v in x.items() if k.endswith("p50_s") or k.endswith("p90_s")}
        print(f"{x['policy']:<11} {x['req_per_s']:>6.2f} {x['tok_per_s']:>8.1f} {ms['ttft_p50_s']:>7.1f}ms "
              f"{ms['ttft_p90_s']:>5.0f}ms {ms['tpot_p50_s']:>7.2f}ms {ms['tpot_p90_s']:>5.2f}ms "
              f"{ms['itl_p50_s']:>6.2f}ms {ms['itl_p90_s']:>5.2f}ms {x['e2e_p50_s']:>7.2f}s {x['e2e_p90_s']:>6.2f}s "
              f"{int(x['exact_length']):>6} {int(x['failed']):>4}")
        for e in x["errors"]:
            print(f"  error ({x['policy']}): {e}")
    if {"continuous", "static"} <= set(args.policies):
        c, s = (next(x for x in rows if x["policy"] == p) for p in ("continuous", "static"))
        print(f"continuous / static: tokens/s x{c['tok_per_s'] / s['tok_per_s']:.2f}, TTFT p50 "
              f"x{c['ttft_p50_s'] / s['ttft_p50_s']:.2f}, TTFT p90 x{c['ttft_p90_s'] / s['ttft_p90_s']:.2f}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"runs/bench/inference_serving_http_{device.type}.json")
    write_json(out, {"device": dev_name, "dtype": str(dtype), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "compiled": engine.compiled, "warmup_s": warm_s,
                     "args": vars(args), "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                     "results": rows})
    print(f"wrote {out}")
    ok = all(x["failed"] == 0 and x["exact_length"] == args.requests for x in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
