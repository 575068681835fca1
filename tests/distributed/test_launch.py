"""Launch plumbing: `lmforge train --nproc N` (torchrun), argv handling, resume on another rank count."""

import json
import subprocess
import sys

import pytest

from lmforge.distributed.launch import strip_nproc, torchrun_argv
from lmforge.errors import ConfigError
from tests.distributed import workers as w


def test_torchrun_argv_drops_nproc():
    argv = ["train", "--out", "r", "--nproc", "2", "--dp=zero1", "train.lr=1e-3"]
    assert strip_nproc(argv) == ["train", "--out", "r", "--dp=zero1", "train.lr=1e-3"]
    assert strip_nproc(["train", "--nproc=4", "x=1"]) == ["train", "x=1"]
    cmd = torchrun_argv(2, strip_nproc(argv))
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["lmforge", "train", "--out", "r", "--dp=zero1", "train.lr=1e-3"]
    with pytest.raises(ConfigError, match="--nproc = 0 must be >= 1"):
        torchrun_argv(0, argv)


TINY = ["model.vocab_size=53", "model.context_length=16", "model.d_model=24", "model.n_layers=2",
        "model.n_heads=3", "model.n_kv_heads=1", "model.d_ff=40", "train.seq_len=12", "train.progress=false",
        "train.eval_every=0", "train.device=cpu", "train.time_budget_s=0", "train.log_every=1",
        "train.checkpoint_every=2", "train.warmup_steps=1"]


def _train(out, shards, nproc, batch, steps, *extra):
    cmd = ["lmforge", "train", "--out", str(out), "--nproc", str(nproc), *extra,
           f"data.train_shards={shards}", f"train.batch_size={batch}", f"train.max_steps={steps}", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                    "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_cli_two_ranks_then_resume_on_one(tmp_path):
    shards = w.write_shards(tmp_path / "shards")
    out = _train(tmp_path / "run", shards, 2, 2, 4, "--dp", "zero1")
    assert out.count("trained 4 steps") == 1  # rank 0 only prints
    first = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # continue the 2-rank run from step 2 on 1 process with the same global batch (2 x 2 = 4)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "run1")
    shutil.rmtree(tmp_path / "run1" / "checkpoints" / "step_000004")
    _train(tmp_path / "run1", shards, 1, 4, 4, "--dp", "zero1", "--resume")
    lines = (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()
    resumed = [json.loads(x)["loss"] for x in lines]
    assert resumed == pytest.approx(first, rel=1e-5)
    # and without --nproc: a plain `lmforge train --resume` reads the sharded optimizer state too
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    shutil.rmtree(tmp_path / "run2" / "checkpoints" / "step_000004")
    cmd = ["lmforge", "train", "--out", str(tmp_path / "run2"), "--resume", f"data.train_shards={shards}",
           "train.batch_size=4", "train.max_steps=4", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == pytest.approx(first, rel=1e-5)
