"""`TrainConfig`: everything the trainer needs besides the model, the data and the loss.

Defaults suit the tiny CPU main job; presets in configs/*.toml change only what differs. Values are
checked here so a bad value fails before any work starts, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.errors import ConfigError


@dataclass
class TrainConfig:
    seed: int = 1337
    # batch: tokens per optimizer step = batch_size * grad_accum * seq_len (* data-parallel ranks)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # None -> the model's context_length
    max_steps: int = 600
    time_budget_s: float | None = None  # stop early (with a checkpoint) after this many seconds; 0 = none
    sampler: Literal["random", "packed"] = "packed"
    shuffle_documents: bool = False  # packed: visit documents in a new random order each epoch
    document_mask: bool = True  # pass doc_ids/positions so attention stays inside documents
    # optimizer
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3  # AdamW LR (for Muon: the LR of embeddings, head, norms, biases)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    # schedule and clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: fraction of steps in the final decay
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # precision and speed
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    compile_cpp_wrapper: bool = False  # with compile: launch kernels from C++ (less host overhead)
    # with compile: "reduce-overhead" replays each micro-step's forward and backward as CUDA graphs
    # (one launch instead of thousands; on CPU it compiles as "default")
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    activation_checkpointing: bool = False
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    # Steps between host reads of the loss and grad norm (the NaN/Inf check). 1: every step, before
    # its update (the host waits for the GPU once per step). N: every N steps, the GPU running ahead
    # in between. 0 (auto): every step on CPU, where reading costs nothing, at log points (log_every)
    # on GPU. Reads also happen before every eval, sample and checkpoint, so a non-finite step stops
    # the run before any later checkpoint is written.
    check_every: int = 0
    sample_every: int = 0  # 0: no samples during training (the main job samples at the end)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True
    wandb_project: str | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> ConfigError:
            return ConfigError(f"TrainConfig: {field} = {getattr(self, field)!r} must be {expected}")

        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints",
                     "muon_ns_steps"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        for name in ("warmup_steps", "eval_every", "log_every", "sample_every", "checkpoint_every", "check_every"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.seq_len is not None and self.seq_len < 1:
            raise bad("seq_len", ">= 1")
        for name in ("lr", "muon_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("beta1", "beta2", "muon_momentum", "min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "in [0, 1]")
        if self.compile_mode not in ("default", "reduce-overhead"):
            raise bad("compile_mode", '"default" or "reduce-overhead"')
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise bad("time_budget_s", ">= 0 (0 = no budget)")

    def tokens_per_step(self, seq_len: int, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * seq_len * world_size
