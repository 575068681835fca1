"""Starting data-parallel runs: `lmforge train ... --nproc N` and `torchrun ... -m lmforge train ...`.

- `torchrun_argv(nproc, argv)`: the single-node torchrun command that re-runs this CLI command in N
  processes (`python -m torch.distributed.run --standalone --nproc-per-node N -m lmforge ...`).
  `lmforge train --nproc N` runs it and waits; multi-node runs call torchrun directly with
  --nnodes/--rdzv-endpoint (docs/distributed.md).
- `pretrain_parallelize(kind, bucket_mb)`: the hook `lmforge.train.pretrain.pretrain` calls inside
  each process: joins the process group, checks that all ranks hold the same config and shards,
  builds the GLOBAL batch builder (per-rank batch x world size) and gives each rank its rows
  (parallel.RankSlice), and makes the model data-parallel (parallel.DataParallel). With "fsdp" the
  optimizer is rebuilt over the sharded parameters (AdamW only), params compute in bf16 on GPUs
  (fp32 master weights and reductions), and activation checkpointing is applied before sharding.

Under torchrun every process runs the same command; only rank 0 prints, logs and writes checkpoint
metadata (see Trainer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from lmforge.errors import ConfigError


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    if nproc < 1:
        raise ConfigError(f"--nproc = {nproc} must be >= 1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lmforge", *argv]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (the children must not relaunch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run this CLI invocation again under torchrun with `nproc` processes; the exit code."""
    argv = strip_nproc(sys.argv[1:] if argv is None else argv)
    return subprocess.call(torchrun_argv(nproc, argv))


def checkpoint_kind(run_dir) -> str | None:
    """The data-parallel kind that wrote the latest checkpoint in `run_dir` (None: single process).
    A one-process resume of a sharded (ZeRO) checkpoint needs the distributed loader."""
    from lmforge.io import read_json
    from lmforge.model.checkpoint import list_checkpoints

    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        return None
    meta = read_json(found[-1] / "trainer.json", what="checkpoint trainer state")
    return (meta.get("distributed") or {}).get("kind")


def _shard_fingerprint(spec) -> list:
    """Names and sizes of the shard files (data + header) behind `spec`."""
    p = Path(spec)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else sorted(p.parent.glob(p.name + "*"))
    return [(f.name, f.stat().st_size) for f in files]


def _fsdp_optimizer_factory(cfg, env):
    """FSDP needs the optimizer built over the sharded parameters: the same build as pretrain's."""
    from lmforge.train.optim import optimizer_from_config

    t = cfg.train
    if t.optimizer != "adamw":
        raise ConfigError(f"--dp fsdp supports train.optimizer = 'adamw' (got {t.optimizer!r}): Muon "
                          "orthogonalises whole matrices; use --dp zero1, which shards by whole parameters")

    def make(model):
        return optimizer_from_config(model, t, cfg.model.vocab_size)

    return make


def pretrain_parallelize(kind: str = "ddp", bucket_mb: float = 25.0, device: str = "auto"):
    """The `parallelize` hook for lmforge.train.pretrain.pretrain (see the module docstring)."""

    def parallelize(cfg, model, optimizer, batches):
        from lmforge.config import to_dict
        from lmforge.distributed.env import check_same_on_ranks, init_distributed
        from lmforge.distributed.parallel import DataParallel, RankSlice
        from lmforge.train.pretrain import make_batches, seq_len_of

        env = init_distributed(device=device)
        check_same_on_ranks(to_dict(cfg), "the run config (config file + overrides)")
        check_same_on_ranks(_shard_fingerprint(cfg.data.train_shards), f"the shards in {cfg.data.train_shards}")
        global_cfg = replace(cfg, train=replace(cfg.train, batch_size=cfg.train.batch_size * env.world_size))
        batches = RankSlice(make_batches(global_cfg, cfg.data.train_shards, seq_len_of(cfg)), env.rank,
                            env.world_size)
        if kind == "fsdp":
            optimizer = _fsdp_optimizer_factory(cfg, env)
        t = cfg.train
        bf16 = env.device.type == "cuda" and t.precision in ("auto", "bf16")
        parallel = DataParallel(model, optimizer, kind=kind, bucket_mb=bucket_mb,
                                fsdp_param_dtype="bf16" if bf16 else None,
                                activation_checkpointing=kind == "fsdp" and t.activation_checkpointing)
        return parallel.optimizer, batches, parallel

    return parallelize
