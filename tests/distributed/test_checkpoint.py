"""The Trainer under DataParallel on 2 gloo ranks: same losses as one process on the global batch;
checkpoints (ZeRO-1 sharded optimizer state, DDP, FSDP2 sharded model + state) resume on 2 ranks and
on 1 process to the same loss sequence.

Tolerance: rel 1e-5 on losses (fp32 sums in another order across ranks, see test_data_parallel);
a resumed run on the same ranks repeats the same arithmetic, so it must match to 1e-6.
"""

import json

import pytest
import torch

from lmforge.errors import DataError
from tests.distributed import workers as w


@pytest.fixture(scope="module")
def run(spawned):
    out, shards, infos = spawned
    return out, shards, infos[0]["checkpoint"]


@pytest.fixture(scope="module")
def single(run):
    torch.set_num_threads(1)
    _, shards, _ = run
    trainer = w.make_trainer(shards, None, None, per_rank_batch=w.ROWS_CKPT, max_steps=4)
    trainer.train()
    return [r["loss"] for r in trainer.history], trainer.tokens


@pytest.mark.parametrize("kind", ["zero1", "ddp", "fsdp"])
def test_two_ranks_equal_one_process(run, single, kind):
    _, _, info = run
    losses, tokens = single
    assert info[kind]["losses"] == pytest.approx(losses, rel=1e-5)
    assert info[kind]["tokens"] == tokens  # global token count (padding targets excluded)


@pytest.mark.parametrize("kind", ["zero1", "ddp", "fsdp"])
def test_resume_on_same_ranks(run, kind):
    _, _, info = run
    assert info[kind]["resumed_losses"] == pytest.approx(info[kind]["losses"][2:], rel=1e-6)


@pytest.mark.parametrize("kind", ["zero1", "ddp", "fsdp"])
def test_resume_on_one_process(run, kind):
    out, shards, info = run
    # one process with the same global batch; a plain Trainer too for the unsharded DDP checkpoint
    for k in (kind, None) if kind == "ddp" else (kind,):
        trainer = w.make_trainer(shards, None, k, per_rank_batch=w.ROWS_CKPT, max_steps=4)
        trainer.resume(out / f"run_{kind}" / "checkpoints" / "step_000002")
        assert trainer.step == 2
        trainer.train()
        assert [r["loss"] for r in trainer.history] == pytest.approx(info[kind]["losses"][2:], rel=1e-5)


def test_fsdp_and_ddp_resume_each_other(run):
    _, _, info = run
    assert info["fsdp_from_ddp"] == pytest.approx(info["ddp"]["losses"][2:], rel=1e-5)
    assert info["ddp_from_fsdp"] == pytest.approx(info["fsdp"]["losses"][2:], rel=1e-5)


def test_checkpoint_layout(run):
    out, _, _ = run
    zero = out / "run_zero1" / "checkpoints" / "step_000004"
    names = sorted(p.name for p in zero.iterdir())
    assert names == ["model.safetensors", "model_config.json", "optimizer.rank-00000-of-00002.safetensors",
                     "optimizer.rank-00001-of-00002.safetensors", "rng.safetensors", "trainer.json"]
    meta = json.loads((zero / "trainer.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "kind": "zero1"}
    assert meta["train_config"]["batch_size"] == w.ROWS_CKPT  # the global batch
    fsdp = out / "run_fsdp" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in fsdp.iterdir()) == [
        "model.rank-00000-of-00002.safetensors", "model.rank-00001-of-00002.safetensors", "model_config.json",
        "optimizer.rank-00000-of-00002.safetensors", "optimizer.rank-00001-of-00002.safetensors",
        "rng.safetensors", "trainer.json"]
    ddp = out / "run_ddp" / "checkpoints" / "step_000004"
    assert (ddp / "optimizer.safetensors").exists()
    lines = (out / "run_zero1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # rank 0 only wrote


def test_resume_with_other_global_batch_is_refused(run):
    from lmforge.errors import CheckpointError

    out, shards, _ = run
    trainer = w.make_trainer(shards, None, "zero1", per_rank_batch=w.ROWS_CKPT + 2, max_steps=4)
    with pytest.raises(CheckpointError, match="train.batch_size = 4, now 6"):
        trainer.resume(out / "run_zero1" / "checkpoints" / "step_000002")


def test_batch_not_divisible_by_ranks():
    from lmforge.distributed.parallel import RankSlice

    batches = RankSlice(iter([{"input_ids": torch.zeros(5, 3)}]), rank=0, world_size=2)
    with pytest.raises(DataError, match="5 rows does not split evenly over 2 ranks"):
        next(batches)
