"""Tables of training runs that the fitters read: from CSV, JSON or JSONL, or built in code.

One row per run (or per logged point of a run's training curve, for approach 1). Canonical
columns: `params` (N), `tokens` (D), `flops` (C), `loss`, and optionally `run` (which curve a row
belongs to), `lr`, `batch_size`. Common spellings are accepted (`N`, `n_params`, `D`, `C`,
`compute`, `final_loss`, `learning_rate`, ...). When only two of N, D, C are given the third follows
from C = 6·N·D, the convention of Kaplan et al. and Hoffmann et al.; a table that gives all three
keeps its own C (e.g. FLOPs counted with attention).

This module reads and validates; it does not fit anything.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import DataError

ALIASES = {
    "params": ("params", "n", "n_params", "num_params", "parameters", "model_size", "nparams"),
    "tokens": ("tokens", "d", "n_tokens", "data", "training_tokens", "num_tokens", "ntokens"),
    "flops": ("flops", "c", "compute", "flop"),
    "loss": ("loss", "l", "final_loss", "val_loss", "eval_loss", "train_loss"),
    "run": ("run", "run_id", "name", "id"),
    "lr": ("lr", "learning_rate", "eta"),
    "batch_size": ("batch_size", "batch", "bs", "batch_tokens"),
}
NUMERIC = ("params", "tokens", "flops", "loss", "lr", "batch_size")


@dataclass
class Runs:
    """Columns of equal length: numeric ones as float arrays, `run` as strings."""

    columns: dict[str, np.ndarray]
    source: str = "runs"

    def __post_init__(self) -> None:
        lengths = {k: len(v) for k, v in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{self.source}: columns have different lengths {lengths}")
        for name in NUMERIC:
            if name in self.columns:
                col = np.asarray(self.columns[name], dtype=np.float64)
                bad = np.flatnonzero(~np.isfinite(col) | (col <= 0))
                if len(bad):
                    raise DataError(f"{self.source}: column '{name}' row {int(bad[0])} is "
                                    f"{float(col[bad[0]])!r}; expected a positive finite number")
                self.columns[name] = col
        n, d, c = (name in self.columns for name in ("params", "tokens", "flops"))
        if n and d and not c:
            self.columns["flops"] = 6.0 * self.columns["params"] * self.columns["tokens"]
        elif n and c and not d:
            self.columns["tokens"] = self.columns["flops"] / (6.0 * self.columns["params"])
        elif d and c and not n:
            self.columns["params"] = self.columns["flops"] / (6.0 * self.columns["tokens"])
        if "run" in self.columns:
            self.columns["run"] = np.asarray([str(x) for x in self.columns["run"]], dtype=object)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.require(name)[0]

    def require(self, *names: str, what: str = "this fit") -> list[np.ndarray]:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DataError(f"{self.source}: {what} needs column(s) {missing}; have {sorted(self.columns)} "
                            f"(aliases accepted: {', '.join(a for m in missing for a in ALIASES.get(m, ()))})")
        if len(self) == 0:
            raise DataError(f"{self.source}: no rows")
        return [self.columns[n] for n in names]

    def select(self, mask: np.ndarray) -> Runs:
        return Runs({k: v[mask] for k, v in self.columns.items()}, self.source)

    @classmethod
    def from_rows(cls, rows: list[dict], source: str = "runs") -> Runs:
        if not rows:
            raise DataError(f"{source}: no rows")
        canon: dict[str, str] = {}
        keys = [str(k) for k in rows[0]]
        for key in keys:  # a column named exactly like a canonical one wins over its aliases
            if key.strip().lower() in ALIASES:
                canon[key] = key.strip().lower()
        for key in keys:
            low = key.strip().lower()
            for name, spellings in ALIASES.items():
                if key not in canon and low in spellings:
                    if name in canon.values():
                        if name == low or any(k.strip().lower() == name for k in canon):
                            continue  # e.g. train_loss next to loss: kept as its own column
                        raise DataError(f"{source}: columns '{key}' and another both mean '{name}'")
                    canon[key] = name
        cols: dict[str, list] = {name: [] for name in canon.values()}
        for i, row in enumerate(rows):
            for key, name in canon.items():
                value = row.get(key)
                if name == "run":
                    cols[name].append(value)
                    continue
                try:
                    cols[name].append(float(value))
                except (TypeError, ValueError):
                    raise DataError(f"{source}: row {i} column '{key}' = {value!r} is not a number") from None
        extra = {}
        for key in rows[0]:
            if key in canon:
                continue
            try:  # other numeric columns (e.g. params_total) are kept under their own names
                extra[str(key)] = np.array([float(r.get(key)) for r in rows])
            except (TypeError, ValueError):
                pass
        return cls({**extra, **{k: np.asarray(v) for k, v in cols.items()}}, source)


def load_runs(path: str | Path) -> Runs:
    """Read runs from .csv (header row), .json (list of objects, {"runs": [...]}, or column lists) or .jsonl."""
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"runs file not found: {path}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(line for line in text.splitlines() if line.strip()
                                       and not line.lstrip().startswith("#")))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and "runs" in data:
                data = data["runs"]
            if isinstance(data, dict):  # columns
                lengths = {len(v) for v in data.values() if isinstance(v, list)}
                if len(lengths) != 1:
                    raise DataError(f"{src}: a column-wise JSON needs lists of equal length")
                n = lengths.pop()
                rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
            elif isinstance(data, list):
                rows = data
            else:
                raise DataError(f"{src}: expected a list of runs or a dict of columns")
        else:
            raise DataError(f"{src}: unknown runs format '{suffix}' (expected .csv, .json or .jsonl)")
    except json.JSONDecodeError as e:
        raise DataError(f"{src}: invalid JSON: {e}") from None
    if any(not isinstance(r, dict) for r in rows):
        raise DataError(f"{src}: every run must be an object with named fields")
    return Runs.from_rows(rows, src)
