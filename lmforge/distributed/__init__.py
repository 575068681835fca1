"""Data-parallel training: own bucketed DDP (ddp.py), ZeRO-1/2 (zero.py), FSDP2 (fsdp.py), the
Trainer hooks (parallel.py), collective checkpoints (checkpoint.py) and torchrun launch (launch.py).
The model never knows: each `apply_*` works on a plain nn.Module and keeps its parameter names."""

from lmforge.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "BucketedDDP": "ddp",
    "NaiveDDP": "ddp",
    "apply_ddp": "ddp",
    "broadcast_parameters": "ddp",
    "DistEnv": "env",
    "check_same_on_ranks": "env",
    "init_distributed": "env",
    "DataParallel": "parallel",
    "RankSlice": "parallel",
    "ZeroOptimizer": "zero",
    "apply_zero": "zero",
})
__all__ = ["BucketedDDP", "NaiveDDP", "apply_ddp", "broadcast_parameters", "DistEnv", "check_same_on_ranks", "init_distributed", "DataParallel", "RankSlice", "ZeroOptimizer", "apply_zero"]
