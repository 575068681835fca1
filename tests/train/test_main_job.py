"""The main job end to end on a tiny corpus and budget, stage skipping, `lmforge train` and
`lmforge generate` on its artifacts."""

import json
import sysconfig
from pathlib import Path

import pytest

from lmforge.cli import main as cli

TINY = ["tokenizer.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=1", "model.context_length=48", "train.batch_size=4", "train.max_steps=8",
        "train.eval_every=4", "train.eval_batches=2", "train.checkpoint_every=4", "train.warmup_steps=2",
        "train.progress=false", "train.log_every=2", "data.workers=1", "sample.max_new_tokens=8",
        "sample.prompts=['def ', 'x = ']"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200 KB of real Python from the standard library as JSONL with stable ids (a stable split)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in ["textwrap.py", "string.py", "fnmatch.py", "colorsys.py", "bisect.py", "shlex.py", "glob.py",
                 "heapq.py", "keyword.py", "getopt.py", "numbers.py", "queue.py", "sched.py"]:
        text = (root / name).read_text(encoding="utf-8")
        for i in range(0, len(text), 1500):  # many small documents so the 2% validation split is non-empty
            docs.append({"id": f"{name}:{i}", "text": text[i:i + 1500]})
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def test_main_job_end_to_end(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["run", "--out", str(run), f"data.corpus=['{corpus}']", *TINY]
    assert cli(args) == 0
    out = capsys.readouterr().out
    for name in ["config.toml", "tokenizer/tokenizer.json", "data/train.bin", "data/val.bin", "metrics.jsonl",
                 "eval.json", "samples.jsonl", "report.html", "checkpoints/step_000008/model.safetensors"]:
        assert (run / name).exists(), name
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 8 and ev["val_bpb"] > 0 and ev["unigram_bpb"] > 0
    assert "validation bits/byte: model" in out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6, 8]
    assert [m["step"] for m in metrics if "val_loss" in m] == [4, 8]
    assert metrics[-1]["val_loss"] == pytest.approx(ev["val_loss"])
    report = (run / "report.html").read_text()
    assert "validation bits per byte" in report and ("<svg" in report or "data:image/png" in report)
    assert "def " in report  # a sample's prompt
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["def ", "x = "]

    # a rerun skips every stage; changing only the sampling redoes only the samples
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] up to date" in out for s in ("tokenizer", "shards", "train", "samples"))
    assert cli([*args, "sample.temperature=0"]) == 0
    out = capsys.readouterr().out
    assert "[train] up to date" in out and "[samples] up to date" not in out

    # `lmforge generate` from the run; `lmforge train` continues the run with more steps
    assert cli(["generate", "--run", str(run), "--prompt", "import ", "--max-new-tokens", "5",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    cfg = run / "config.toml"
    assert cli(["train", "--config", str(cfg), "--out", str(run), "train.max_steps=10"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli(["train", "--config", str(cfg), "--out", str(run), "--tokenizer", str(run / "tokenizer"),
                "--resume", "train.max_steps=10"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-2:] == [8, 10]
    assert cli(["train", "--config", str(cfg), "--out", str(run), "--resume", "train.lr=1.0"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_bad_config_is_refused(tmp_path, capsys):
    assert cli(["run", "--out", str(tmp_path), "train.optimiser=adamw"]) == 2
    assert "unknown key 'train.optimiser'" in capsys.readouterr().err
    assert cli(["run", "--out", str(tmp_path), "model.preset=gpt-9"]) == 2
    assert "model.preset = 'gpt-9'" in capsys.readouterr().err
    assert cli(["train", "--out", str(tmp_path)]) == 2
    assert "data.train_shards is not set" in capsys.readouterr().err
