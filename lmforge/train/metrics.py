"""Training measurements: MFU against a table of device peaks, bits-per-byte, the unigram
baseline, and the metrics.jsonl writer (plus optional wandb / tensorboard mirrors).

MFU = achieved model FLOP/s / the device's dense bf16 peak. Model FLOPs come from the model's own
accounting (`lmforge.model.accounting.flops_per_token`), so they include attention. Peaks are the
vendors' dense (no sparsity) bf16 tensor-core numbers; an unknown device gets no MFU rather than a
guess.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.io import read_jsonl

# Dense bf16 peak FLOP/s by device-name substring (first match wins; order matters: 'H100 PCIe'
# before 'H100'). Sources: NVIDIA/AMD data sheets.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of a CUDA device from the table, or None (CPU, unknown card)."""
    name = device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None) -> float | None:
    if not flops_per_token or not peak:
        return None
    return flops_per_token * tokens_per_s / peak


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 byte length of each token id (0 for special tokens and ids past the tokenizer's vocab)."""
    special = set(getattr(tokenizer, "special_tokens", {}).values()) if isinstance(
        getattr(tokenizer, "special_tokens", None), dict) else set()
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if i in special:
            continue
        lengths[i] = len(tokenizer.decode_bytes([i]))
    return lengths


def unigram_log_probs(tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    """log p(token) of an add-one-smoothed unigram model fitted on `tokens` (the baseline)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts = counts.astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line, flushed per write), mirrored to wandb /
    tensorboard when asked. Reopening after a resume drops lines from steps past `resume_step`,
    so the file describes exactly one trajectory."""

    def __init__(self, path: str | os.PathLike | None, resume_step: int | None = None,
                 wandb_project: str | None = None, tensorboard_dir: str | os.PathLike | None = None,
                 config: dict | None = None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            elif resume_step is None and self.path.exists():
                self.path.unlink()
            self._f = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_project:
            from lmforge.errors import require

            wandb = require("wandb", "wandb logging", package="wandb")
            self._wandb = wandb.init(project=wandb_project, config=config or {})
        self._tb = None
        if tensorboard_dir:
            from lmforge.errors import require

            require("tensorboard", "tensorboard logging", package="tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "time")}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return read_jsonl(path, what="metrics file")
