"""Reading the step statistics without a host sync per step (train.check_every), and CUDA-graph
compilation (train.compile_mode = "reduce-overhead") as far as a CPU can run it: both must give the
losses of the plain path."""

from unittest import mock

import pytest
import torch

from lmforge.config import load
from lmforge.errors import ConfigError
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import TrainingDiverged

from .test_trainer import _packed_trainer, _poisoned_from


def _reads(trainer):
    """Wrap trainer.read_stats: the step at each read that found something pending, and how many."""
    seen, inner = [], trainer.read_stats

    def read_stats():
        done = inner()
        if done:
            seen.append((trainer.step, len(done)))
        return done

    trainer.read_stats = read_stats
    return seen


def test_deferred_reads_give_the_losses_of_per_step_reads(tmp_path, shard_dir):
    """check_every = 3 reads every 3 steps and before checkpoints only, yet every step's record
    (loss, grad norm, tokens) and the weights equal those of a run read before every update."""
    eager = _packed_trainer(tmp_path / "a", shard_dir, 9, check_every=1)
    eager.train()
    lazy = _packed_trainer(tmp_path / "b", shard_dir, 9, check_every=3, log_every=3, checkpoint_every=4)
    reads = _reads(lazy)
    lazy.train()
    assert reads == [(3, 3), (4, 1), (6, 2), (8, 2), (9, 1)]  # reads at 3, 6, 9; checkpoints 4, 8
    keys = ("step", "loss", "grad_norm", "tokens", "lr")
    assert [[r[k] for k in keys] for r in lazy.history] == [[r[k] for k in keys] for r in eager.history]
    assert lazy.tokens == eager.tokens
    for a, b in zip(eager.model.parameters(), lazy.model.parameters()):
        assert torch.equal(a, b)
    from lmforge.train.metrics import read_metrics

    logged = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert logged == [3, 6, 9]


def test_deferred_nan_check_stops_before_the_next_checkpoint(tmp_path, shard_dir):
    """A NaN at step 6, read at step 8 (the next log/checkpoint point): the run stops naming step 6,
    no checkpoint holds a step after it, and the last good one resumes with finite weights."""
    t = _packed_trainer(tmp_path / "run", shard_dir, 12, check_every=8, log_every=8, checkpoint_every=4,
                        keep_checkpoints=5)
    t.loss_fn = _poisoned_from(6)
    reads = _reads(t)
    with pytest.raises(TrainingDiverged, match=r"step 6: loss = nan.*read at step 8 \(read every 8 steps"):
        t.train()
    assert reads == [(4, 4)]  # steps 5-8 were queued without waiting; the read at 8 raised
    assert [r["step"] for r in t.history] == [1, 2, 3, 4, 5]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000004"]
    good = _packed_trainer(tmp_path / "run", shard_dir, 12)
    assert good.resume() and good.step == 4
    assert all(torch.isfinite(p).all() for p in good.model.parameters())


def test_check_every_auto():
    from lmforge.train.trainer import steps_between_reads

    cfg = TrainConfig(check_every=0, log_every=5)
    assert steps_between_reads(cfg, torch.device("cpu")) == 1  # reading costs nothing on CPU
    assert steps_between_reads(cfg, torch.device("cuda")) == 5  # log points
    assert steps_between_reads(TrainConfig(check_every=3), torch.device("cuda")) == 3


def test_check_every_n_reads_every_n_steps(tmp_path, shard_dir):
    t = _packed_trainer(tmp_path / "run", shard_dir, 7, check_every=2, log_every=100, checkpoint_every=0)
    reads = _reads(t)
    t.train()
    assert reads == [(2, 2), (4, 2), (6, 2), (7, 1)]  # the last step is a log point


def test_compile_mode_config():
    cfg = load(TrainConfig, overrides=["compile=true", "compile_mode=reduce-overhead"])
    assert cfg.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode = 'cudagraphs'"):
        TrainConfig(compile_mode="cudagraphs")
    with pytest.raises(ConfigError, match="check_every"):
        TrainConfig(check_every=-1)


def _graph_trainer(run_dir, shard_dir, unused_param=False, **kw):
    """A run without dropout (compiled dropout draws other random numbers than eager); with
    `unused_param`, the model has a trainable parameter no loss reaches."""
    from lmforge.data.loader import DocumentPacker, TokenStream
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import Trainer, lm_loss

    from .conftest import VOCAB, tiny_model

    model, mcfg = tiny_model(seed=3)
    if unused_param:
        model.unused = torch.nn.Parameter(torch.ones(4, 4))
    cfg = TrainConfig(**{**dict(max_steps=3, batch_size=3, grad_accum=2, warmup_steps=1, lr=1e-2,
                                eval_every=0, checkpoint_every=0, progress=False, log_every=1), **kw})
    opt = build_optimizer(model, "adamw", lr=cfg.lr, vocab_size=VOCAB)
    return Trainer(model, opt, DocumentPacker(TokenStream(shard_dir), 3, 23), lm_loss, cfg, run_dir=run_dir,
                   model_config=mcfg)


def _grad_buffers(trainer, record):
    trainer.buffers = [*getattr(trainer, "buffers", []), [p.grad.data_ptr() for p in trainer.model.parameters()]]


def test_reduce_overhead_trainer_path_equals_the_plain_path(tmp_path, shard_dir):
    """The trainer's side of CUDA graphs, run eagerly (torch.compile replaced by the identity): it
    asks inductor for CUDA graphs, marks a graph step before each micro-step, keeps the gradients
    in buffers of its own across steps (never a graph's outputs) and gives the plain run's losses
    and weights bit for bit."""
    plain = _graph_trainer(tmp_path / "a", shard_dir)
    plain.train()
    asked = []

    def identity_compile(fn, options=None):
        asked.append(options)
        return fn

    with mock.patch.object(torch, "compile", identity_compile):
        t = _graph_trainer(tmp_path / "b", shard_dir, compile=True, compile_mode="reduce-overhead")
    assert asked == [{"triton.cudagraphs": True}]
    t.hooks = [_grad_buffers]
    with mock.patch.object(torch.compiler, "cudagraph_mark_step_begin") as mark:
        t.train()
    assert mark.call_count == 3 * t.cfg.grad_accum
    assert t.buffers[0] == t.buffers[1] == t.buffers[2]
    assert [r["loss"] for r in t.history] == [r["loss"] for r in plain.history]
    for a, b in zip(plain.model.parameters(), t.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_reduce_overhead_compiles_on_cpu(tmp_path, shard_dir):
    """The real compile (~1 minute on 2 cores): inductor is asked for CUDA graphs and skips them for
    the CPU graph; the losses are the eager run's (compiled code: within 1e-5)."""
    from torch._dynamo.utils import counters

    eager = _graph_trainer(tmp_path / "a", shard_dir)
    eager.train()
    torch._dynamo.reset()
    counters.clear()
    t = _graph_trainer(tmp_path / "b", shard_dir, compile=True, compile_mode="reduce-overhead")
    t.hooks = [_grad_buffers]
    t.train()
    assert counters["inductor"]["cudagraph_skips"] >= 1  # requested, and skipped for the CPU graph
    assert counters["stats"]["unique_graphs"] >= 1
    assert t.buffers[0] == t.buffers[1] == t.buffers[2]
    assert [r["loss"] for r in t.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-5)
    torch._dynamo.reset()


def test_reduce_overhead_with_data_parallelism_is_refused(shard_dir):
    """CUDA graphs' own gradient buffers and data parallelism's buckets are not combined: a clear
    error names the setting instead of gradients nobody has checked."""
    from types import SimpleNamespace

    from lmforge.data.loader import DocumentPacker, TokenStream
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import Trainer, lm_loss

    from .conftest import VOCAB, tiny_model

    model, _ = tiny_model(seed=3)
    cfg = TrainConfig(max_steps=1, batch_size=2, compile=True, compile_mode="reduce-overhead", progress=False)
    opt = build_optimizer(model, "adamw", lr=cfg.lr, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="compile_mode = 'reduce-overhead'.*data parallelism"):
        Trainer(model, opt, DocumentPacker(TokenStream(shard_dir), 2, 23), lm_loss, cfg,
                parallel=SimpleNamespace(is_main=True))


@pytest.mark.parametrize("check_every", [1, 3])
def test_hooks_see_throughput_at_log_points_and_time_budget_stops_are_logged(tmp_path, shard_dir, check_every):
    """Hooks (and the progress bar) get each record once, in order; log-point records carry
    tokens_per_s and mfu when the hooks see them, as metrics.jsonl does."""
    from lmforge.io import read_jsonl

    seen = []
    t = _packed_trainer(tmp_path, shard_dir, 6, check_every=check_every, log_every=3, checkpoint_every=0,
                        hooks=[lambda tr, r: seen.append((r["step"], "tokens_per_s" in r, "mfu" in r))])
    t.train()
    assert seen == [(s, s % 3 == 0, s % 3 == 0) for s in range(1, 7)]
    logged = list(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in logged] == [3, 6] and all(r["tokens_per_s"] > 0 for r in logged)
    # a time-budget stop off the log cadence logs its last step, with its throughput
    stop = _packed_trainer(tmp_path / "budget", shard_dir, 6, check_every=check_every, log_every=4,
                           checkpoint_every=0, time_budget_s=1e-9)
    assert stop.train()["stop"] == "time_budget"
    logged = list(read_jsonl(tmp_path / "budget" / "metrics.jsonl"))
    assert [r["step"] for r in logged] == [1] and logged[0]["tokens_per_s"] > 0


def test_reduce_overhead_leaves_parameters_without_gradients_alone(tmp_path, shard_dir):
    """The graph path's own gradient buffers must not make an unused parameter look trained: it
    keeps .grad None for the optimizer (no weight decay, momentum or state), as the plain path."""
    plain = _graph_trainer(tmp_path / "a", shard_dir, unused_param=True, weight_decay=0.1)
    plain.train()
    with mock.patch.object(torch, "compile", lambda fn, options=None: fn):
        t = _graph_trainer(tmp_path / "b", shard_dir, unused_param=True, weight_decay=0.1,
                           compile=True, compile_mode="reduce-overhead")
    with mock.patch.object(torch.compiler, "cudagraph_mark_step_begin"):
        t.train()
    for trainer in (plain, t):
        assert torch.equal(trainer.model.unused, torch.ones(4, 4)) and trainer.model.unused.grad is None
        assert not trainer.optimizer.state.get(trainer.model.unused)
    assert [r["loss"] for r in t.history] == [r["loss"] for r in plain.history]
