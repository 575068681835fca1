"""HTML → text extraction throughput: resiliparse (lmforge's default) vs trafilatura.

Input: the example pipeline's pages (pydoc HTML of standard-library modules, generated offline by
`lmforge.data.example`), repeated `--repeat` times. Each engine extracts every page; the table
gives MB/s of HTML in, pages/s, and the ratio to trafilatura's fastest mode (`fast=True`, which
skips its fallback extractors). Writes JSON (--out, default runs/bench/data_extract.json).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from lmforge.data.example import make_example_input
from lmforge.data.readers import read_warc
from lmforge.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/data_extract.json")
    args = ap.parse_args()

    import trafilatura
    from resiliparse.extract.html2text import extract_plain_text

    with tempfile.TemporaryDirectory() as tmp:
        pages = [d.text for p in make_example_input(tmp) for d in read_warc(str(p))]
    mb = sum(len(p.encode()) for p in pages) / 1e6 * args.repeat
    n = len(pages) * args.repeat
    engines = {
        "resiliparse main_content": lambda h: extract_plain_text(h, main_content=True, preserve_formatting=True),
        "resiliparse all text": lambda h: extract_plain_text(h, main_content=False, preserve_formatting=True),
        "trafilatura fast=True": lambda h: trafilatura.extract(h, fast=True) or "",
        "trafilatura default": lambda h: trafilatura.extract(h) or "",
    }
    times, chars = {}, {}
    for name, fn in engines.items():
        fn(pages[0])  # warm-up (lazy imports, caches)
        t0 = time.process_time()  # CPU seconds: robust to neighbours on a shared machine
        total = 0
        for _ in range(args.repeat):
            for page in pages:
                total += len(fn(page))
        times[name], chars[name] = time.process_time() - t0, total // args.repeat
    base = times["trafilatura fast=True"]
    print(f"{len(pages)} pages x {args.repeat}, {mb:.1f} MB of HTML")
    print(f"{'engine':28s} {'CPU s':>8s} {'MB/s':>7s} {'pages/s':>8s} {'chars out':>10s} {'vs trafilatura fast':>20s}")
    rows = []
    for name, s in times.items():
        print(f"{name:28s} {s:8.2f} {mb / s:7.2f} {n / s:8.0f} {chars[name]:10d} {base / s:19.2f}x")
        rows.append({"engine": name, "seconds": s, "mb_per_s": mb / s, "pages_per_s": n / s,
                     "chars_out": chars[name], "speedup_vs_trafilatura_fast": base / s})
    write_json(Path(args.out), {"device": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
                                "date": time.strftime("%Y-%m-%d"), "mb": mb, "pages": n, "rows": rows})


if __name__ == "__main__":
    main()
