"""Training checkpoints: everything needed to continue a run bit-exactly.

`run_dir/checkpoints/step_000123/` (written with `lmforge.io.atomic_dir`, so it is complete or absent):
  model.safetensors, model_config.json   the model (lmforge.model.checkpoint format)
  optimizer.safetensors                  optimizer state tensors (moments, momentum buffers)
  rng.safetensors                        torch CPU (and CUDA) generator states
  trainer.json                           step, tokens seen, data-loader position, optimizer scalars
                                         and param groups, train config, and a manifest (size +
                                         sha256 of every file) checked on load

A checkpoint whose files are missing, truncated or altered, or that was made for a different
model or a different train config (beyond fields that do not change the trajectory), is refused
with the reason. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import CheckpointError, LMForgeError
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.checkpoint import WEIGHTS, list_checkpoints, load_weights, save_model

FORMAT = "lmforge.train_checkpoint"
VERSION = 1
# Train-config fields that may differ on resume: they do not change the loss trajectory.
RESUMABLE_CHANGES = {"max_steps", "time_budget_s", "eval_every", "eval_batches", "log_every",
                     "sample_every", "checkpoint_every", "keep_checkpoints", "progress", "wandb_project",
                     "tensorboard", "compile", "compile_cpp_wrapper", "compile_mode", "activation_checkpointing",
                     "device", "check_every"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, the rest as JSON-able data)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, st in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, model_config, optimizer, step: int,
                    tokens: int, data_state: dict, train_config: dict, extra: dict | None = None) -> Path:
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_model(tmp, model, model_config)
        opt_tensors, opt_rest = split_optimizer_state(optimizer.state_dict())
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        _save_tensors(tmp / "rng.safetensors", rng)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
        write_json(tmp / "trainer.json", {
            "format": FORMAT, "version": VERSION, "step": step, "tokens": tokens, "data": data_state,
            "optimizer": opt_rest, "train_config": train_config, "extra": extra or {}, "files": manifest,
        })
    return path


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(path: str | os.PathLike, verify: bool = True) -> dict:
    path = Path(path)
    try:
        meta = read_json(path / "trainer.json", what="checkpoint trainer state")
    except LMForgeError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/trainer.json: not an lmforge training checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported "
                              f"(expected {VERSION})")
    for name, info in meta["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path} is truncated: {name} has {f.stat().st_size} bytes, "
                                  f"expected {info['bytes']}")
        if verify and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256")
    return meta


def check_compatible(meta: dict, path: Path, model_config, train_config: dict) -> None:
    """Refuse a checkpoint made for another model or another trajectory, naming the first difference."""
    from lmforge.config import to_dict
    from lmforge.model.checkpoint import load_model_config

    saved_model = to_dict(load_model_config(path))
    ours = to_dict(model_config)
    for key in sorted(set(saved_model) | set(ours)):
        if saved_model.get(key) != ours.get(key):
            raise CheckpointError(f"checkpoint {path} was made for a different model: model.{key} = "
                                  f"{saved_model.get(key)!r} there, {ours.get(key)!r} now")
    saved = meta["train_config"]
    for key in sorted(set(saved) | set(train_config)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != train_config.get(key):
            raise CheckpointError(f"checkpoint {path} was made with train.{key} = {saved.get(key)!r}, "
                                  f"now {train_config.get(key)!r}; resuming would not continue the same run")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer, model_config=None,
                    train_config: dict | None = None, device: str | torch.device = "cpu") -> dict:
    """Restore model, optimizer and RNG states in place; returns trainer.json's content."""
    path = Path(path)
    meta = read_trainer_state(path)
    if model_config is not None and train_config is not None:
        check_compatible(meta, path, model_config, train_config)
    if not (path / WEIGHTS).exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {WEIGHTS} is missing")
    load_weights(path, model, device=device)
    opt_state = join_optimizer_state(_load_tensors(path / "optimizer.safetensors"), meta["optimizer"])
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this optimizer: {e}") from None
    rng = _load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda_keys = sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    cuda_states = [rng[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return meta
