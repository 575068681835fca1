"""The one training loop. Pretraining, SFT, DPO and GRPO differ only in the batches they feed it and
the loss they compute; everything else lives here: precision, gradient accumulation, clipping,
the LR schedule, evaluation, NaN/Inf stops, checkpoints and resume, metrics and progress.

Contract:
- `batches`: an iterator of batches (dicts of tensors) with `state_dict()` / `load_state_dict()`
  (see lmforge.data.loader), so a resumed run sees exactly the batches it would have seen.
- `loss_fn(model, batch) -> (loss_sum, n_tokens, metrics)`: the SUM of per-token losses (plus aux
  terms times n_tokens) and the number of tokens it covers. The trainer divides the accumulated
  gradient by the total token count of the step, so the update is the token-weighted mean over all
  micro-batches: micro-batch 1 x accumulation 8 equals micro-batch 8 x accumulation 1.
- `evaluate(model) -> dict`: optional periodic evaluation (e.g. val loss and bits per byte).

Host syncs: a step's loss, grad norm and token count stay on the device until they are read
(`read_stats`, one wait for the GPU for all pending steps): on GPU at log points by default
(`train.check_every`), and always before an eval, samples or a checkpoint, so the host queues the
next steps while the GPU runs and a non-finite step is never followed by a saved checkpoint. On CPU
(and with `train.check_every = 1`) each step is read before its update. Hooks and the progress bar
see each step's record once, in order, when it is read. `train.compile_mode =
"reduce-overhead"` replays each micro-step's compiled forward and backward as CUDA graphs.

The trainer never imports a model class; it works on any nn.Module.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge.config import to_dict
from lmforge.errors import ConfigError, LMForgeError
from lmforge.train.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import MetricsLog, device_name, mfu, peak_flops
from lmforge.train.schedule import clip_grad_norm, lr_factor, set_lr

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor | int, dict]]


class TrainingDiverged(LMForgeError):
    """The loss or gradient norm became NaN/Inf; the last good checkpoint is left as it was."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on GPU (weights and grads stay fp32), plain fp32 on CPU unless asked."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Language-modelling loss for the lmforge Transformer interface: summed CE (+ aux terms)."""
    kwargs = {k: batch[k] for k in ("positions", "doc_ids") if k in batch}
    out = model(batch["input_ids"], batch["targets"], **kwargs)
    n = out.n_tokens if isinstance(out.n_tokens, torch.Tensor) else torch.tensor(out.n_tokens)
    loss_sum = out.ce_sum.float()
    metrics = {}
    for name, value in (out.aux or {}).items():
        loss_sum = loss_sum + value.float() * n
        metrics[name] = value.detach()
    return loss_sum, n, metrics


def steps_between_reads(cfg: TrainConfig, device: torch.device) -> int:
    """train.check_every, with 0 (auto) resolved: every step on CPU (nothing runs ahead there, so
    reading costs nothing), at log points on an accelerator."""
    return cfg.check_every or (1 if device.type == "cpu" or not cfg.log_every else cfg.log_every)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them.

    Patches the `forward` of every block in the model's block list ('blocks', 'layers' or 'h') on the
    instance, so parameter names (and checkpoints) are unchanged. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    for name in ("blocks", "layers", "h"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                if "forward" in vars(block):
                    continue  # already patched
                inner = block.forward
                block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(inner)
            return len(blocks)
    raise LMForgeError(f"activation checkpointing: {type(model).__name__} has no 'blocks'/'layers' list")


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn: LossFn,
                 cfg: TrainConfig, *, run_dir: str | Path | None = None, model_config=None,
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 sample: Callable[[nn.Module], list[dict]] | None = None,
                 flops_per_token: float | None = None, config_record: dict | None = None,
                 hooks: list[Callable[[Trainer, dict], None]] | None = None, parallel=None):
        self.cfg = cfg
        # Data parallelism (lmforge.distributed.DataParallel), or None for one process: gradient sync,
        # global token totals, global grad norm, rank-0-only output and collective checkpoints.
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        self.device = next(model.parameters()).device
        self.model = model  # the module whose weights are saved (never compiled/wrapped)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.optimizer = optimizer
        self.batches = batches
        self.loss_fn = loss_fn
        # Compile the loss computation as a whole, not just the model: then the logits are not an
        # output of the compiled graph, so the compiler can fuse the head with the cross-entropy and
        # free them early (measured on GPT-2 small: see docs/benchmarks.md, Training).
        self._loss = self._call_loss
        # CUDA graphs replay the compiled forward and backward of a micro-step with one launch each
        # (docs/benchmarks.md, Training: at micro-batch 12 the host launches kernels barely faster
        # than the GPU runs them).
        self._cudagraphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
        if self._cudagraphs and parallel is not None:
            # data parallelism hooks gradients into its own buckets mid-backward; with the graphs'
            # gradient buffers (see _zero_grads) that combination is unmeasured and untested
            raise ConfigError("train.compile_mode = 'reduce-overhead' (CUDA graphs) runs in one process "
                              "only; with data parallelism use train.compile_mode = 'default'")
        self.check_every = steps_between_reads(cfg, self.device)
        self._grad_buffers: dict[int, torch.Tensor] = {}  # CUDA graphs: id(param) -> its .grad buffer
        self._touched: set[int] = set()  # CUDA graphs: ids of params that got a gradient this step
        if self._cudagraphs:
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: self._touched.add(id(p)))
        if cfg.compile:
            # cpp_wrapper: inductor launches the kernels from C++ instead of Python: less host time
            # per kernel; slower to compile. Both are inductor options ("reduce-overhead" is
            # {"triton.cudagraphs": True}): torch.compile takes a mode or options, not both.
            options = {}
            if self._cudagraphs:
                options["triton.cudagraphs"] = True
            if cfg.compile_cpp_wrapper:
                options["cpp_wrapper"] = True
            self._loss = torch.compile(self._call_loss, options=options or None)
        self.run_dir = Path(run_dir) if run_dir else None
        self.model_config = model_config
        self.evaluate_fn = evaluate
        self.sample_fn = sample
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(self.device)
        self.config_record = config_record or {}
        self.hooks = hooks or []
        self.step = 0
        self.tokens = 0
        self.history: list[dict] = []  # every step's record, appended when its statistics are read
        # steps whose loss / grad norm / token count are still on the device: (record, stats, metrics)
        self._unread: list[tuple[dict, torch.Tensor, dict]] = []
        self.last_eval: dict | None = None
        self._log: MetricsLog | None = None

    def _call_loss(self, batch):
        return self.loss_fn(self.model, batch)

    # -- checkpoints --
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir else None

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        self.read_stats()  # a step that went non-finite since the last read is never saved
        path = self.checkpoint_dir / f"step_{self.step:06d}"
        if self.parallel is not None:
            return self.parallel.save_checkpoint(self, path)
        save_checkpoint(path, model=self._plain_model(), model_config=self.model_config,
                        optimizer=self.optimizer, step=self.step, tokens=self.tokens,
                        data_state=self.batches.state_dict(), train_config=to_dict(self.cfg),
                        extra=self.config_record)
        prune_checkpoints(self.checkpoint_dir, self.cfg.keep_checkpoints)
        return path

    def _plain_model(self) -> nn.Module:
        return self.model

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from `path` or from the latest checkpoint in the run dir; False if there is none."""
        if path is None:
            found = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
            if not found:
                return False
            path = found[-1]
        if self.parallel is not None:
            meta = self.parallel.load_checkpoint(self, path)
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            self.batches.load_state_dict(meta["data"])
            return True
        meta = load_checkpoint(path, model=self._plain_model(), optimizer=self.optimizer,
                               model_config=self.model_config, train_config=to_dict(self.cfg),
                               device=self.device)
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        self.batches.load_state_dict(meta["data"])
        return True

    # -- one optimizer step --
    def train_step(self, read: bool = True) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its record.

        read=True: the step's loss, grad norm and token count are read at once (the host waits for
        the GPU) and a non-finite value stops the run before the update. read=False: the update is
        queued without waiting; the record is filled in and checked by the next `read_stats()`."""
        cfg = self.cfg
        factor = lr_factor(self.step, cfg.schedule, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio,
                           cfg.decay_fraction)
        set_lr(self.optimizer, factor)
        self._zero_grads()
        loss_total = torch.zeros((), device=self.device)
        n_total = torch.zeros((), device=self.device, dtype=torch.long)
        metrics: dict[str, float] = {}
        for i in range(cfg.grad_accum):
            batch = next(self.batches)
            last = self.parallel is None or i == cfg.grad_accum - 1
            if self._cudagraphs:
                # Each micro-step replays the graphs anew, overwriting the previous replay's outputs:
                # nothing may read those afterwards. The loss and token count were added into
                # loss_total / n_total below, the gradients into .grad (see _zero_grads).
                torch.compiler.cudagraph_mark_step_begin()
            with contextlib.nullcontext() if last else self.parallel.no_sync():  # sync once per step
                with autocast_context(self.device, cfg.precision):
                    loss_sum, n, m = self._loss(batch)
                loss_sum.backward()
            loss_total += loss_sum.detach().float()
            n_total += n
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
        if self._cudagraphs:
            self._drop_untouched_grads()
        if self.parallel is not None:  # totals over all ranks: divide by the global token count
            loss_total, n_total = self.parallel.reduce_totals(loss_total, n_total)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # Token-weighted mean over the whole step (see module docstring): one pass over the
        # gradients divides by the token count and clips.
        if self.parallel is None:
            grad_norm = clip_grad_norm(params, cfg.grad_clip, divide_by=n_total.clamp(min=1))
        else:
            torch._foreach_div_([p.grad for p in params], n_total.clamp(min=1).to(params[0].grad.dtype))
            grad_norm = self.parallel.clip_grad_norm(params, cfg.grad_clip)
        stats = torch.stack([loss_total / n_total.clamp(min=1), grad_norm.float().to(self.device),
                             n_total.float()])
        record = {"step": self.step + 1, "loss": None, "grad_norm": None,
                  "lr": self.optimizer.param_groups[0]["lr"], "lr_factor": factor, "tokens": None}
        self._unread.append((record, stats, metrics))
        if read:
            self.read_stats()  # before the update: a non-finite step never reaches the weights
        self.optimizer.step()
        for moe in getattr(self.model, "moe_layers", lambda: [])():
            moe.update_routing_bias()
        self.step += 1
        return record

    def _zero_grads(self) -> None:
        if not self._cudagraphs:
            self.optimizer.zero_grad(set_to_none=True)
            return
        # Under CUDA graphs .grad must not BE a backward graph output: the next replay overwrites it.
        # With .grad None, autograd would adopt the first micro-step's gradient tensor as .grad
        # (pytorch/pytorch#169545: "accessing tensor output of CUDAGraphs that has been overwritten").
        # So gradients live in buffers of their own, zeroed in place, and every micro-step's
        # gradients are added into them; _drop_untouched_grads then gives back None to parameters
        # that got none.
        for p in self.model.parameters():
            if p.requires_grad:
                if id(p) not in self._grad_buffers:
                    self._grad_buffers[id(p)] = torch.zeros_like(p)
                p.grad = self._grad_buffers[id(p)]
        torch._foreach_zero_(list(self._grad_buffers.values()))
        self._touched.clear()

    def _drop_untouched_grads(self) -> None:
        """A parameter no micro-step gave a gradient gets .grad None, as without CUDA graphs, so the
        optimizer skips it (no weight decay, no momentum, no state)."""
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in self._touched:
                p.grad = None

    def read_stats(self) -> list[dict]:
        """Read the statistics of the steps run since the last read (one wait for the GPU), fill in
        their records and append them to `history`. Raises TrainingDiverged at the first step whose
        loss or grad norm is not finite."""
        if not self._unread:
            return []
        pending, self._unread = self._unread, []
        values = torch.stack([stats for _, stats, _ in pending]).tolist()
        done = []
        for (record, _, metrics), (loss, norm, n) in zip(pending, values):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingDiverged(self._diverged(record["step"], loss, norm))
            self.tokens += int(n)
            record.update(loss=loss, grad_norm=norm, tokens=self.tokens)
            for k, v in metrics.items():
                record[k] = float(v) if not isinstance(v, torch.Tensor) or v.numel() == 1 else v.tolist()
            self.history.append(record)
            done.append(record)
        return done

    def _diverged(self, step: int, loss: float, norm: float) -> str:
        where = f" in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        if self.step < step:  # read before its update
            when = "stopped before the update"
        else:
            when = (f"read at step {self.step} (read every {self.check_every} steps: train.check_every); "
                    "no checkpoint was written after it")
        return (f"step {step}: loss = {loss}, grad norm = {norm} is not finite; {when} (the last good "
                f"checkpoint is left intact{where}). Lower train.lr, raise warmup or check the data.")

    # -- the loop --
    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        resumed = self.resume() if resume else False
        log_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        tb_dir = self.run_dir / "tensorboard" if (self.run_dir and cfg.tensorboard) else None
        if not self.is_main:  # rank-0-only logs and progress
            log_path = tb_dir = None
        self._log = MetricsLog(log_path, resume_step=self.step if resumed else None,
                               wandb_project=cfg.wandb_project if self.is_main else None,
                               tensorboard_dir=tb_dir, config=self.config_record)
        progress = _progress(cfg.max_steps, self.step, enabled=cfg.progress and self.is_main)
        start = time.perf_counter()
        window_t, window_tokens = time.perf_counter(), self.tokens
        seen = len(self.history)
        logged = None  # the last record written to metrics.jsonl
        stop_reason = "max_steps"

        def report(log: bool = False) -> None:
            """Read what is pending; with `log`, the newest record gets the throughput since the last
            log and goes to metrics.jsonl. Progress and hooks see each record once, in order, when
            it is read (so with train.check_every > 1 a hook may run a few steps after its step)."""
            nonlocal seen, window_t, window_tokens, logged
            self.read_stats()
            newest = self.history[-1] if self.history else None
            log = log and newest is not None and newest is not logged
            if log:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tps = (self.tokens - window_tokens) / max(now - window_t, 1e-9)
                newest["tokens_per_s"] = tps
                newest["mfu"] = mfu(self.flops_per_token, tps, self.peak)
                window_t, window_tokens = now, self.tokens
            for record in self.history[seen:]:
                progress.update(record)
                for hook in self.hooks:
                    hook(self, record)
            if log:
                self._log.write(newest)
                logged = newest
            seen = len(self.history)

        try:
            while self.step < cfg.max_steps:
                self.train_step(read=self.check_every == 1)
                step, last = self.step, self.step == cfg.max_steps
                log_now = _every(step, cfg.log_every) or last
                do_eval = bool(self.evaluate_fn) and (_every(step, cfg.eval_every) or (last and cfg.eval_every))
                do_sample = bool(self.sample_fn) and _every(step, cfg.sample_every)
                do_save = _every(step, cfg.checkpoint_every) or (last and cfg.checkpoint_every)
                # The GPU runs ahead of the host between reads; every step is read before anything
                # that looks at the weights or writes them (eval, samples, checkpoints).
                if log_now or do_eval or do_sample or do_save or _every(step, self.check_every):
                    report(log=log_now)
                if do_eval:
                    self.run_eval()
                if do_sample:
                    self.run_samples()
                if do_save:
                    self.save_checkpoint()
                over = bool(cfg.time_budget_s) and time.perf_counter() - start > cfg.time_budget_s
                if cfg.time_budget_s and self.parallel is not None:
                    over = self.parallel.any_rank(over)  # every rank stops at the same step
                if over:
                    stop_reason = "time_budget"
                    report(log=True)  # the last step is logged even off the cadence
                    self.save_checkpoint()
                    break
            report()
        finally:
            progress.close()
            self._log.close()
        elapsed = time.perf_counter() - start
        return {"step": self.step, "tokens": self.tokens, "seconds": elapsed, "stop": stop_reason,
                "device": device_name(self.device)}

    def run_eval(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), autocast_context(self.device, self.cfg.precision):
            result = self.evaluate_fn(self.model)
        self.model.train(was_training)
        record = {"step": self.step, **result}
        if self._log:
            self._log.write(record)
        self.last_eval = record
        return record

    def run_samples(self) -> list[dict]:
        was_training = self.model.training
        self.model.eval()
        samples = self.sample_fn(self.model)
        self.model.train(was_training)
        if self.run_dir and self.is_main:
            import json

            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps({"step": self.step, **s}) + "\n")
        return samples


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class _progress:
    """tqdm progress bar showing loss and throughput (a no-op when disabled or tqdm is missing)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{record['loss']:.4f}"}
        if record.get("tokens_per_s"):
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
