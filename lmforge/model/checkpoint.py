"""Model checkpoint format: weights in safetensors, the architecture in JSON. Used by training
(inside its checkpoints) and by inference/eval to load a trained model.

A model directory holds:
  model.safetensors   the state dict of the unwrapped module (tied weights stored once; safetensors
                      records which names alias it)
  model_config.json   {"format": "lmforge.model", "version": 1, "config": ModelConfig as plain data}

Loading never unpickles: safetensors for tensors, JSON for the rest. A missing, truncated or
mismatched file raises CheckpointError saying which file and why. This module does not save
optimizer or trainer state (train/checkpoint.py does).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import CheckpointError
from lmforge.io import read_json, write_json

FORMAT = "lmforge.model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
# A training run keeps checkpoints as run_dir/checkpoints/step_N/ (model files + trainer state).
_STEP_DIR = re.compile(r"^step_(\d+)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers (so state-dict keys never get prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


class _Unshared:
    """A model as safetensors' save_model / load_model see it: parameters that are row views of a
    larger buffer (packed projections, layers.PackedLinears) appear as copies, so that only tied
    weights (one tensor under several names) count as shared storage, which safetensors stores
    once; loading still copies into the model's own parameters (the packing stays)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
                for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.model.load_state_dict(state_dict, strict=strict)


def save_model(directory: str | os.PathLike, model: nn.Module, cfg) -> None:
    """Write model.safetensors + model_config.json into an existing directory (e.g. an atomic_dir)."""
    from safetensors.torch import save_model as st_save_model

    from lmforge.config import to_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS + ".tmp")
    st_save_model(_Unshared(unwrap(model)), str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, directory / WEIGHTS)
    write_json(directory / CONFIG, {"format": FORMAT, "version": VERSION, "config": to_dict(cfg)})


def load_model_config(directory: str | os.PathLike):
    """The ModelConfig saved in a model directory."""
    from lmforge.config import from_dict
    from lmforge.model.config import ModelConfig

    path = Path(directory) / CONFIG
    try:
        data = read_json(path, what="model config")
    except CheckpointError:
        raise
    except Exception as e:  # LMForgeError from read_json: re-raise as a checkpoint problem
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lmforge model config (format={data.get('format')!r})"
                              if isinstance(data, dict) else f"{path}: not an lmforge model config")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: model checkpoint version {data.get('version')} is not supported "
                              f"(expected {VERSION})")
    return from_dict(ModelConfig, data["config"], source=str(path))


def load_weights(directory: str | os.PathLike, model: nn.Module, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (strict: the key sets and shapes must match exactly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load_model

    path = Path(directory) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"model weights not found: {path}")
    try:
        missing, unexpected = st_load_model(_Unshared(unwrap(model)), str(path), strict=False, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model: missing keys {sorted(missing)[:5]}, "
                              f"unexpected keys {sorted(unexpected)[:5]}")


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Build the Transformer described by a model directory and load its weights: (model, cfg)."""
    from lmforge.model import Transformer

    cfg = load_model_config(directory)
    model = Transformer(cfg)
    load_weights(directory, model, device="cpu")
    return model.to(device), cfg


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (step_N dirs with trainer.json) under `directory`, oldest first.

    Lives here, with the model format, because training, inference and evaluation all locate a
    run's checkpoints; trainer.json is written last, so its presence marks a complete checkpoint.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer.json").exists()]
