"""report.html for a run: loss curves (train and validation), throughput, evaluation against the
unigram baseline, samples and the resolved config, in one self-contained file.

The loss plot is a PNG from matplotlib when it is installed (`pip install 'lmforge[plot]'`), and
otherwise an inline SVG drawn here; either way the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from lmforge.io import write_text
from lmforge.train.metrics import read_metrics


def _svg_plot(series: dict[str, list[tuple[float, float]]], width=640, height=320) -> str:
    """A minimal line chart: one polyline per series, axes with min/max labels."""
    points = [p for s in series.values() for p in s]
    if not points:
        return "<p>(no metrics yet)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1
    pad = 48
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)
    sy = lambda y: height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
             'fill="none" stroke="#999"/>',
             f'<text x="{pad}" y="{height - pad + 16}">{x0:g}</text>',
             f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {x1:g}</text>',
             f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>']
    for i, (name, s) in enumerate(series.items()):
        if not s:
            continue
        c = colors[i % len(colors)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        if len(s) == 1:
            parts.append(f'<circle cx="{sx(s[0][0]):.1f}" cy="{sy(s[0][1]):.1f}" r="3" fill="{c}"/>')
        parts.append(f'<text x="{width - pad - 4}" y="{pad + 14 + 14 * i}" text-anchor="end" '
                     f'fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _png_plot(series: dict[str, list[tuple[float, float]]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, s in series.items():
        if s:
            ax.plot([p[0] for p in s], [p[1] for p in s], marker="o" if len(s) < 30 else None,
                    markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f'<img alt="loss curves" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def loss_plot(metrics: list[dict]) -> str:
    series = {"train loss": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
              "val loss": [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]}
    return _png_plot(series) or _svg_plot(series)


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _fmt(v, spec=".4f"):
    return format(v, spec) if isinstance(v, int | float) else "n/a"


def write_report(run_dir: str | Path, cfg, stages=None) -> Path:
    from lmforge.config import to_dict

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    timed = [m for m in train if m.get("tokens_per_s")]
    evaluation = {}
    if (run_dir / "eval.json").exists():
        evaluation = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    samples = []
    if (run_dir / "samples.jsonl").exists():
        samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()
                   if x.strip()]
    stage_rows = []
    if stages is not None and stages.dir.exists():
        for p in sorted(stages.dir.glob("*.json")):
            stage_rows.append((p.stem, json.dumps(json.loads(p.read_text())["result"])[:300]))
    tps = sorted(m["tokens_per_s"] for m in timed)
    mfus = [m["mfu"] for m in timed if m.get("mfu") is not None]
    summary = [
        ("steps", train[-1]["step"] if train else 0),
        ("tokens", train[-1]["tokens"] if train else 0),
        ("final train loss", _fmt(train[-1]["loss"]) if train else "n/a"),
        ("validation loss (nats/token)", _fmt(evaluation.get("val_loss"))),
        ("validation bits per byte", _fmt(evaluation.get("val_bpb"))),
        ("unigram baseline bits per byte", _fmt(evaluation.get("unigram_bpb"))),
        ("median tokens/s", _fmt(tps[len(tps) // 2], ".0f") if tps else "n/a"),
        ("median MFU", _fmt(sorted(mfus)[len(mfus) // 2], ".1%") if mfus else "n/a (no known peak for this device)"),
    ]
    sample_html = "".join(
        f"<div class='sample'><b>{html.escape(s['prompt'])}</b>{html.escape(s['completion'])}</div>"
        for s in samples)
    config_text = json.dumps(to_dict(cfg), indent=2)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lmforge run: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
.sample {{ white-space: pre-wrap; font-family: monospace; background: #f6f6f6; padding: 8px; margin: 8px 0; }}
pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; }}
</style></head><body>
<h1>lmforge run <code>{html.escape(str(run_dir))}</code></h1>
<h2>Summary</h2>{_table(summary)}
<h2>Loss</h2>{loss_plot(metrics)}
<h2>Samples</h2>{sample_html or "<p>(none)</p>"}
<h2>Stages</h2>{_table(stage_rows)}
<h2>Config</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = run_dir / "report.html"
    write_text(out, page)
    return out
