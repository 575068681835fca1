"""Spawn helper for the model-parallel tests (TP, pipeline, ring attention, EP, mesh).

`run_checks(["module:function", ...], tmp_path, world)` starts `world` gloo processes ONCE and runs
every named check in each (process start-up dominates on a 2-core machine). A check is
`fn(rank, world) -> dict` of JSON numbers; the parent gets one dict per rank per check and asserts.
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, out: str, checks: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    try:
        results = {}
        for name in checks:
            module, fn = name.split(":")
            torch.manual_seed(0)
            results[name] = getattr(importlib.import_module(module), fn)(rank, world)
            dist.barrier()
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_checks(checks: list[str], out: Path, world: int = 2) -> dict[str, list[dict]]:
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.start_processes(_worker, args=(world, str(out), checks), nprocs=world, join=True, start_method="spawn")
    except Exception as e:
        errors = [p.read_text() for p in sorted(out.glob("rank*.error"))]
        raise AssertionError(f"worker failed: {e}\n" + "\n".join(errors)) from None
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [pr[name] for pr in per_rank] for name in checks}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# Every default (2-rank) check of the model-parallel test modules, run in ONE spawn per pytest
# session whichever module asks first: gloo start-up is most of the cost on this machine.
DEFAULT_CHECKS = [
    "tests.distributed.test_ring_attention:ring_causal_gqa",
    "tests.distributed.test_ring_attention:ring_full_mha",
    "tests.distributed.test_ring_attention:ring_transformer",
    "tests.distributed.test_pipeline:gpipe_tied",
    "tests.distributed.test_pipeline:f1b_untied",
    "tests.distributed.test_pipeline:f1b_moe",
    "tests.distributed.test_pipeline:interleaved_tied",
    "tests.distributed.test_vocab_parallel:vocab_ce_2",
    "tests.distributed.test_tp:tp_sp",
    "tests.distributed.test_tp:tp_plain",
    "tests.distributed.test_tp:tp_sp_sandwich_gelu",
    "tests.distributed.test_tp:tp_sp_replicated_head",
    "tests.distributed.test_tp:tp_vocab_no_sp",
    "tests.distributed.test_expert_parallel:ep_no_drop",
    "tests.distributed.test_expert_parallel:ep_capacity",
    "tests.distributed.test_expert_parallel:ep_model",
    "tests.distributed.test_mesh:dp_ep",
]
# The default 4-rank checks (composed meshes; 3-rank vocab parallelism on a subgroup), one spawn.
FOUR_RANK_CHECKS = [
    "tests.distributed.test_vocab_parallel:vocab_3",
    "tests.distributed.test_composed:pp_tp",
    "tests.distributed.test_composed:pp_tp_interleaved",
    "tests.distributed.test_composed:pp_dp",
    "tests.distributed.test_composed:pp_dp_interleaved",
    "tests.distributed.test_composed:pp_cp",
    "tests.distributed.test_composed:pp_ep",
    "tests.distributed.test_ring_attention:ring_four_ranks",
]
_shared: dict[int, dict[str, list[dict]]] = {}


def shared_results(tmp_path_factory, world: int = 2) -> dict[str, list[dict]]:
    if world not in _shared:
        checks = DEFAULT_CHECKS if world == 2 else FOUR_RANK_CHECKS
        _shared[world] = run_checks(checks, tmp_path_factory.mktemp(f"parallel{world}"), world)
    return _shared[world]
