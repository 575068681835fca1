"""Checkpoints of data-parallel runs, in the Trainer's format, written by all ranks together.

The directory is the one lmforge.train.checkpoint writes (model.safetensors, model_config.json,
rng.safetensors, trainer.json with a sha256 manifest), made atomically: rank 0 creates the staging
directory, every rank writes its files into it, and rank 0 renames it into place after a barrier,
so `step_N/` is complete or absent. Differences:
- With a sharded optimizer (ZeRO), each rank writes `optimizer.rank-R-of-W.safetensors` with the
  states of the parameters it owns, keyed by the global parameter index. Loading reads only the
  keys this rank now owns from whichever files hold them, so a run resumes on any number of ranks
  (including one process). Otherwise rank 0 writes the usual `optimizer.safetensors`.
- trainer.json records `distributed: {world_size, kind}` and the GLOBAL batch as
  `train_config.batch_size` (per-rank batch x world size), so the compatibility check accepts a
  different rank count with the same global batch, and a plain single-process Trainer with that
  batch size can resume a DDP checkpoint.
- The data state is the global batch builder's (see parallel.RankSlice), world-size independent.

Model weights are replicated under DDP/ZeRO, so rank 0 writes them once. Under FSDP nothing is
gathered: each rank writes its rows of the model and optimizer state (fsdp_checkpoint.py), and any
rank count (FSDP, DDP/ZeRO or one process through this loader) reads back the rows it needs. An
FSDP run can also resume an unsharded (DDP / single-process) checkpoint. The checkpoint directory must be on a file system every rank sees
(shared storage for multi-node runs).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmforge.config import to_dict
from lmforge.errors import CheckpointError
from lmforge.io import atomic_dir, write_json
from lmforge.model.checkpoint import WEIGHTS, load_weights, save_model
from lmforge.train.checkpoint import (
    FORMAT,
    VERSION,
    _load_tensors,
    _save_tensors,
    _sha256,
    check_compatible,
    join_optimizer_state,
    prune_checkpoints,
    read_trainer_state,
    split_optimizer_state,
)

_SHARD = re.compile(r"^optimizer\.rank-(\d+)-of-(\d+)\.safetensors$")


def global_train_config(train_cfg, world_size: int) -> dict:
    d = to_dict(train_cfg)
    d["batch_size"] = d["batch_size"] * world_size
    return d


def _broadcast_path(parallel, path: str | None) -> str:
    """Rank 0's staging directory on every rank."""
    if parallel.world_size == 1:
        return path
    import torch.distributed as dist

    box = [path]
    src = dist.get_global_rank(parallel.group, 0) if parallel.group is not None else 0
    dist.broadcast_object_list(box, src=src, group=parallel.group)
    return box[0]


def _gather(parallel, obj) -> list:
    if parallel.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * parallel.world_size
    dist.all_gather_object(out, obj, group=parallel.group)
    return out


def _write_rank_files(tmp: Path, parallel, optimizer, trainer) -> dict:
    if parallel.fsdp:
        from lmforge.distributed.fsdp_checkpoint import write_shards

        shapes, rest = write_shards(tmp, trainer, parallel)
        return {**rest, "shapes": shapes}
    if not parallel.sharded_optimizer:
        return {}
    tensors, rest = split_optimizer_state(optimizer.state_dict())
    name = f"optimizer.rank-{parallel.rank:05d}-of-{parallel.world_size:05d}.safetensors"
    _save_tensors(tmp / name, tensors)
    return rest


def _fsdp_names(model, optimizer) -> list[str]:
    """Parameter name of each optimizer index (param_groups order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _fsdp_load(trainer, path: Path, opt_state: dict) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = load_file(str(path / WEIGHTS))
    result = set_model_state_dict(trainer.model, full, options=StateDictOptions(full_state_dict=True,
                                                                                 strict=False))
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path / WEIGHTS} does not fit this model: missing keys "
                              f"{sorted(result.missing_keys)[:5]}, unexpected keys {sorted(result.unexpected_keys)[:5]}")
    names = _fsdp_names(trainer.model, trainer.optimizer)
    osd = {"state": {names[i]: st for i, st in opt_state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    set_optimizer_state_dict(trainer.model, trainer.optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))


def save_checkpoint(trainer, path, parallel) -> Path:
    """Collective: every rank calls it. Returns the checkpoint path."""
    path = Path(path)
    opt = trainer.optimizer
    sharded_keys = [k for k, v in trainer.model.state_dict().items() if hasattr(v, "to_local")]
    if parallel.is_main:
        with atomic_dir(path) as tmp:
            _broadcast_path(parallel, str(tmp))
            rest = _write_rank_files(tmp, parallel, opt, trainer)
            rests = _gather(parallel, rest)
            parallel.barrier()  # every rank's shard is on disk
            distributed = {"world_size": parallel.world_size, "kind": parallel.kind}
            if parallel.fsdp:  # every rank wrote its rows of the model and optimizer state
                from lmforge.model.checkpoint import CONFIG
                from lmforge.model.checkpoint import FORMAT as MODEL_FORMAT
                from lmforge.model.checkpoint import VERSION as MODEL_VERSION

                write_json(tmp / CONFIG, {"format": MODEL_FORMAT, "version": MODEL_VERSION,
                                          "config": to_dict(trainer.model_config)})
                opt_rest = {"scalars": rest["scalars"], "param_groups": rest["param_groups"]}
                distributed.update(shapes=rest["shapes"], sharded=sharded_keys)
            elif parallel.sharded_optimizer:
                save_model(tmp, trainer.model, trainer.model_config)
                scalars: dict = {}
                for r in rests:
                    scalars.update(r["scalars"])
                opt_rest = {"scalars": scalars, "param_groups": rests[0]["param_groups"]}
            else:
                save_model(tmp, trainer.model, trainer.model_config)
                tensors, opt_rest = split_optimizer_state(opt.state_dict())
                _save_tensors(tmp / "optimizer.safetensors", tensors)
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng["cuda.0"] = torch.cuda.get_rng_state()
            _save_tensors(tmp / "rng.safetensors", rng)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}
            write_json(tmp / "trainer.json", {
                "format": FORMAT, "version": VERSION, "step": trainer.step, "tokens": trainer.tokens,
                "data": trainer.batches.state_dict(), "optimizer": opt_rest,
                "train_config": global_train_config(trainer.cfg, parallel.world_size),
                "extra": trainer.config_record, "files": manifest,
                "distributed": distributed,
            })
        prune_checkpoints(path.parent, trainer.cfg.keep_checkpoints)
    else:
        tmp = Path(_broadcast_path(parallel, None))
        rest = _write_rank_files(tmp, parallel, opt, trainer)
        _gather(parallel, rest)
        parallel.barrier()
    parallel.barrier()  # the directory is in place before anyone goes on
    return path


def _read_optimizer_tensors(path: Path, wanted: set[int] | None) -> dict[str, torch.Tensor]:
    """Optimizer tensors from optimizer.safetensors or from all rank shards; only indices in
    `wanted` (None: all) are read from disk."""
    from safetensors import SafetensorError, safe_open

    single = path / "optimizer.safetensors"
    files = [single] if single.exists() else sorted(p for p in path.iterdir() if _SHARD.match(p.name))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no optimizer state (optimizer.safetensors or "
                              "optimizer.rank-*-of-*.safetensors)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if wanted is None or int(key.split(".", 1)[0]) in wanted:
                        out[key] = st.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated: {e}") from None
    return out


def load_checkpoint(trainer, path, parallel) -> dict:
    """Restore model, optimizer (this rank's part), RNG; returns trainer.json's content."""
    path = Path(path)
    meta = read_trainer_state(path)
    if trainer.model_config is not None:  # batch sizes are compared as global batches
        check_compatible(meta, path, trainer.model_config, global_train_config(trainer.cfg, parallel.world_size))
    opt = trainer.optimizer
    wanted = None
    if parallel.sharded_optimizer:
        wanted = {opt.index_of[id(p)] for p in opt.params if opt.owns(p)}
    if (meta.get("distributed") or {}).get("shapes"):  # written sharded by an FSDP run
        from lmforge.distributed.fsdp_checkpoint import load_shards

        state = load_shards(path, meta, trainer, parallel, wanted)
        if wanted is not None:
            state["state"] = {i: s for i, s in state["state"].items() if i in wanted}
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this optimizer: {e}") from None
        _load_rng(path)
        return meta
    if not (path / WEIGHTS).exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {WEIGHTS} is missing")
    if not parallel.fsdp:
        load_weights(path, trainer.model, device=trainer.device)
    tensors = _read_optimizer_tensors(path, wanted)
    if not parallel.fsdp:
        tensors = {k: v.to(trainer.device) for k, v in tensors.items()}
    state = join_optimizer_state(tensors, meta["optimizer"])
    if wanted is not None:
        state["state"] = {i: s for i, s in state["state"].items() if i in wanted}
    else:
        # scalars of every index are in trainer.json; keep only entries that have their tensors
        have = {int(k.split(".", 1)[0]) for k in tensors}
        state["state"] = {i: s for i, s in state["state"].items() if i in have}
    try:
        if parallel.fsdp:
            _fsdp_load(trainer, path, state)
        else:
            opt.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this optimizer: {e}") from None
    _load_rng(path)
    return meta


def _load_rng(path: Path) -> None:
    rng = _load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda.0" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda.0"])
