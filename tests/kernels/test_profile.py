"""The profiling script runs real training steps and reports kernel shares that add up."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_profile.py"


def test_profile_script_writes_trace_and_shares(tmp_path):
    pytest.importorskip("lmforge.model")
    spec = importlib.util.spec_from_file_location("kernels_profile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    top = mod.profile_training("tiny", ["n_layers=1"], steps=1, warmup=0, batch=1, seq=16, device="cpu",
                               out=str(tmp_path), top=50)
    assert (tmp_path / "trace.json").stat().st_size > 1000
    saved = json.loads((tmp_path / "top_kernels.json").read_text())
    assert saved["top"] == top
    shares = [r["share"] for r in top]
    assert shares == sorted(shares, reverse=True) and 0.0 < sum(shares) <= 1.0 + 1e-9
    assert any(r["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for r in top)  # the matmuls show up
