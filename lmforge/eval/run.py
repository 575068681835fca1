"""Run a list of evaluation tasks on one model and record the results: JSON, a plain-text table,
and a section appended to the run's report.html.

Task specs (what `lmforge eval PATH --tasks ...` takes):
- `bpb`: loss / perplexity / bits-per-byte over a corpus (given separately, e.g. the validation split);
- `mmlu=FILE`, `hellaswag=FILE`, `arc=FILE`, `mc=FILE`: multiple-choice (tasks.py);
- `gsm8k=FILE`: generative math with answer extraction (generative.py);
- `gen=FILE`: generic generation, rows {prompt, answer}, checked with `extractor` (number, letter
  or exact match after normalisation) and stopped at `stop`;
- `judge=FILE`: the model answers FILE's questions (chat template, greedy) and a judge behind an
  OpenAI-compatible endpoint compares them with FILE's `answer` (the baseline), position-swapped
  (judge.py); FILE is JSONL/Parquet with question, answer.
A spec may carry a name: `mmlu:algebra=data/algebra.csv`.

Results go to `<out>/results.json` (every task, with per-item details in `<out>/<task>.items.json`)
and the report gets an "Evaluation" section, replaced (not duplicated) when eval runs again.
"""

from __future__ import annotations

import html
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.io import read_json, write_json, write_text

MC_FORMATS = ("mmlu", "hellaswag", "arc", "mc")
KINDS = ("bpb",) + MC_FORMATS + ("gsm8k", "gen", "judge")


@dataclass
class TaskSpec:
    name: str
    kind: str
    path: str | None = None


def parse_task(spec: str) -> TaskSpec:
    head, _, path = spec.partition("=")
    kind, _, name = head.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"task {spec!r}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind != "bpb" and not path:
        raise ConfigError(f"task {spec!r}: give the task file as {kind}=PATH")
    return TaskSpec(name or kind, kind, path or None)


# The headline metrics of each kind, in table order.
HEADLINE = {"bpb": ("bits_per_byte", "loss", "perplexity"), "gsm8k": ("accuracy", "pass@1", "maj@"),
            "gen": ("accuracy", "pass@1", "maj@"),
            "judge": ("win_rate", "ci_low", "ci_high", "consistency")}
for _fmt in MC_FORMATS:
    HEADLINE[_fmt] = ("acc", "acc_norm", "acc_token", "acc_byte")


def headline(kind: str, result: dict) -> list[tuple[str, float]]:
    out = []
    for key in HEADLINE[kind]:
        for k, v in result.items():
            if (k == key or (key.endswith("@") and k.startswith(key))) and isinstance(v, (int, float)):
                out.append((k, v))
    return out


def format_table(results: dict[str, dict]) -> str:
    """Rows `task  metric  value  n`."""
    rows = [("task", "metric", "value", "n")]
    for name, res in results.items():
        n = res.get("n", res.get("documents", ""))
        for metric, value in headline(res["kind"], res):
            rows.append((name, metric, f"{value:.4f}" if math.isfinite(value) else str(value), str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def write_results(out_dir: str | Path, model_name: str, results: dict[str, dict], meta: dict) -> Path:
    """results.json (headline numbers) + <task>.items.json (per-item details); merges with earlier tasks."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    previous = read_json(path, "eval results")["tasks"] if path.exists() else {}
    summary = {}
    for name, res in results.items():
        items = res.get("items")
        if items is not None:
            write_json(out_dir / f"{_safe(name)}.items.json", items, indent=None)
        summary[name] = {k: v for k, v in res.items() if k != "items"}
    write_json(path, {"model": model_name, **meta, "tasks": {**previous, **summary}})
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


_BEGIN, _END = "<!-- lmforge-eval:begin -->", "<!-- lmforge-eval:end -->"


def append_to_report(report: str | Path, results_json: str | Path) -> None:
    """Put (or replace) an Evaluation section holding the results table before </body>."""
    report, data = Path(report), read_json(results_json, "eval results")
    page = report.read_text(encoding="utf-8") if report.exists() else "<!doctype html><html><body></body></html>"
    page = re.sub(re.escape(_BEGIN) + ".*?" + re.escape(_END), "", page, flags=re.S)
    when = html.escape(str(data.get("date", "")))
    section = (f"{_BEGIN}<h2>Evaluation</h2><p>{html.escape(str(data.get('checkpoint', '')))} {when}</p>"
               f"<pre>{html.escape(format_table(data['tasks']))}</pre>{_END}")
    page = page.replace("</body>", section + "\n</body>") if "</body>" in page else page + section
    write_text(report, page)


def run_tasks(model, tokenizer, specs: list[TaskSpec], *, corpus=None, engine_factory=None, num_fewshot: int = 0,
              limit: int | None = None, batch_size: int = 32, strategy: str = "auto", stride: int | None = None,
              max_documents: int | None = None, n_samples: int = 1, temperature: float = 0.0,
              max_tokens: int = 256, seed: int = 0, judge=None, extractor: str = "exact",
              stop: list[str] | None = None, log=print) -> dict[str, dict]:
    """Evaluate each task; returns {name: result dict with 'kind' and 'seconds'}."""
    from lmforge.eval.generative import GSM8K_STOP, evaluate_generative, load_gen, load_gsm8k
    from lmforge.eval.intrinsic import evaluate_corpus
    from lmforge.eval.tasks import evaluate_mc, load_mc

    results, engine = {}, None
    for spec in specs:
        t0 = time.perf_counter()
        if spec.kind == "bpb":
            if corpus is None:
                raise ConfigError("task 'bpb' needs a corpus")
            res = evaluate_corpus(model, tokenizer, corpus, stride=stride, batch_size=max(1, batch_size // 4),
                                  max_documents=max_documents)
        elif spec.kind in MC_FORMATS:
            items = load_mc(spec.path, spec.kind)
            res = evaluate_mc(model, tokenizer, items, fmt=spec.kind, num_fewshot=num_fewshot, limit=limit,
                              batch_size=batch_size, strategy=strategy, seed=seed)
        elif spec.kind == "judge":
            res = _judge_task(spec, tokenizer, engine := engine or engine_factory(), judge, limit, max_tokens, seed)
        else:
            if spec.kind == "gsm8k":
                items, ex, st = load_gsm8k(spec.path, num_fewshot=num_fewshot)[:limit], "number", GSM8K_STOP
            else:
                items, ex, st = load_gen(spec.path, extractor)[:limit], extractor, (stop or ["\n\n"])
            engine = engine or engine_factory()
            res = evaluate_generative(engine, tokenizer, items, extractor=ex, n=n_samples, temperature=temperature,
                                      max_tokens=max_tokens, stop=st, seed=seed)
        res["kind"], res["seconds"] = spec.kind, time.perf_counter() - t0
        if spec.path:
            res["path"] = str(spec.path)
        results[spec.name] = res
        log(f"{spec.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(spec.kind, res))
            + f" ({res['seconds']:.1f} s)")
    return results


def _judge_task(spec: TaskSpec, tokenizer, engine, judge, limit, max_tokens, seed) -> dict:
    from lmforge.eval.judge import PairItem, answer_with_engine, pairwise_compare
    from lmforge.eval.tasks import read_records

    if judge is None:
        raise ConfigError("task 'judge' needs a judge endpoint (--judge-url and --judge-model)")
    rows = read_records(spec.path)[:limit]
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            raise ConfigError(f"{spec.path}: row {i} needs 'question' and 'answer' (the baseline's answer)")
    ours = answer_with_engine(engine, tokenizer, [r["question"] for r in rows], max_tokens)
    res = pairwise_compare([PairItem(r["question"], a, r["answer"]) for r, a in zip(rows, ours)], judge, seed=seed)
    for d, a in zip(res["items"], ours):
        d["answer"] = a
    return res
