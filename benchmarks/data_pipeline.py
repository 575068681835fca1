"""Whole data pipeline throughput: documents/s per step and per core, and 1 → 2 worker scaling.

Input: pydoc HTML pages of every standard-library module that imports cleanly (a few hundred real
pages, generated offline before timing), in 8 gzipped WARC files. Pipeline: the example pipeline's
steps (extract, langid, exact + MinHash dedup, PII, Gopher quality + repetition, FineWeb, JSONL and
byte-token outputs), 8 tasks, run once with 1 worker process and once with 2.

Prints per-step documents/s and MB/s (from the steps' own timers, summed over tasks), the end-to-end
documents/s for each worker count and the speed-up. Writes JSON (--out, default
runs/bench/data_pipeline.json). On a shared machine the scaling number says as much about the
neighbours as about the code: the script also records os.getloadavg() at the start.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from lmforge.config import load_toml
from lmforge.data.example import render
from lmforge.data.executor import PipelineConfig, run_pipeline
from lmforge.data.pipeline import StepSpec
from lmforge.data.readers import write_warc
from lmforge.io import write_json

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3", "ensurepip"}


def make_input(directory: Path, n_files: int = 8) -> int:
    pages = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            importlib.import_module(name)
            pages.append((f"https://docs.example.org/{name}.html", render(name)))
        except Exception:  # modules that need a missing C library or a platform feature
            continue
    for i in range(n_files):
        write_warc(directory / f"stdlib_{i:02d}.warc.gz", pages[i::n_files])
    return len(pages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/data_pipeline.json")
    args = ap.parse_args()
    example = load_toml(Path(__file__).parents[1] / "lmforge" / "data" / "example_pipeline.toml")
    steps = [StepSpec(**s) for s in example["steps"]]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        n_pages = make_input(tmp / "in")
        mb = sum(p.stat().st_size for p in (tmp / "in").iterdir()) / 1e6
        results = {}
        for workers in (1, 2):
            cfg = PipelineConfig(input=[str(tmp / "in")], output_dir=str(tmp / f"out{workers}"), steps=steps,
                                 tasks=8, workers=workers)
            t0 = time.perf_counter()
            stats = run_pipeline(cfg)
            results[workers] = (time.perf_counter() - t0, stats)
    wall1, stats1 = results[1]
    wall2, _ = results[2]
    print(f"{n_pages} pages, {mb:.1f} MB of gzipped WARC, 8 tasks; load average at start {load[0]:.1f}")
    print(f"{'step':20s} {'docs in':>8s} {'docs/s':>9s} {'MB/s in':>8s}")
    per_step = {}
    for label, s in stats1.items():
        rate = s.docs_in / s.seconds if s.seconds else float("inf")
        print(f"{label:20s} {s.docs_in:8d} {rate:9.0f} {s.bytes_in / 1e6 / max(s.seconds, 1e-9):8.2f}")
        per_step[label] = {"docs_in": s.docs_in, "seconds": s.seconds, "docs_per_s": rate}
    print(f"end to end, 1 worker : {wall1:6.2f} s  {n_pages / wall1:7.1f} docs/s per core")
    print(f"end to end, 2 workers: {wall2:6.2f} s  {n_pages / wall2 / 2:7.1f} docs/s per core  "
          f"speed-up {wall1 / wall2:.2f}x")
    write_json(Path(args.out), {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "loadavg_at_start": load, "command": " ".join(sys.argv),
                                "date": time.strftime("%Y-%m-%d"), "pages": n_pages, "mb_warc": mb,
                                "wall_s": {"1": wall1, "2": wall2}, "speedup_2_workers": wall1 / wall2,
                                "per_step": per_step})


if __name__ == "__main__":
    main()
