"""Data-parallel training: own bucketed DDP (ddp.py), ZeRO-1/2 (zero.py), FSDP2 (fsdp.py), the
Trainer hooks (parallel.py), collective checkpoints (checkpoint.py) and torchrun launch (launch.py).
The model never knows: each `apply_*` works on a plain nn.Module and keeps its parameter names."""

from lmforge.distributed.ddp import BucketedDDP, NaiveDDP, apply_ddp, broadcast_parameters
from lmforge.distributed.env import DistEnv, check_same_on_ranks, init_distributed
from lmforge.distributed.parallel import DataParallel, RankSlice
from lmforge.distributed.zero import ZeroOptimizer, apply_zero

__all__ = ["BucketedDDP", "NaiveDDP", "apply_ddp", "broadcast_parameters", "DistEnv", "check_same_on_ranks",
           "init_distributed", "DataParallel", "RankSlice", "ZeroOptimizer", "apply_zero"]
