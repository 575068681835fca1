"""The HTTP serving benchmark's arithmetic and plumbing (benchmarks/inference_serving_http.py):
its metrics from hand-made timestamps, its seeded workload, and its synthetic tokenizer."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inference_serving_http.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("inference_serving_http", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _req(sent, stamps, want, usage=None, finish="length", error=None):
    return {"arrival": sent, "sent": sent, "stamps": stamps, "usage": len(stamps) if usage is None else usage,
            "want": want, "finish": finish, "error": error}


def test_metrics_by_hand(bench):
    results = [_req(0.0, [0.5, 0.6, 0.8], 3),  # TTFT 0.5, TPOT (0.8-0.5)/2 = 0.15, gaps 0.1 0.2
               _req(1.0, [1.1, 1.3], 2),  # TTFT 0.1, TPOT 0.2, gap 0.2
               _req(2.0, [2.3, 2.4, 2.5, 2.6], 5),  # TTFT 0.3, TPOT 0.1, gaps 0.1 x3; not its max_tokens
               _req(2.5, [], 4, usage=0, finish=None, error="HTTP 429: busy")]
    m = bench.summarize(results)
    assert m["requests"] == 4 and m["failed"] == 1 and m["exact_length"] == 2
    assert m["tokens"] == 9 and m["wall_s"] == pytest.approx(2.6)
    assert m["tok_per_s"] == pytest.approx(9 / 2.6) and m["req_per_s"] == pytest.approx(3 / 2.6)
    assert m["ttft_p50_s"] == pytest.approx(0.3)
    assert m["ttft_p90_s"] == pytest.approx(0.3 + 0.8 * (0.5 - 0.3))  # linear between order statistics
    assert m["tpot_p50_s"] == pytest.approx(0.15)
    assert m["itl_p50_s"] == pytest.approx(0.1)  # gaps 0.1 x4, 0.2 x2
    assert m["e2e_p50_s"] == pytest.approx(0.6) and m["errors"] == ["HTTP 429: busy"]


def test_workload_is_seeded_and_within_bounds(bench):
    args = Namespace(seed=3, requests=50, rate=20.0, min_prompt=5, max_prompt=9, min_new=2, max_new=4, vocab=97)
    a, b = bench.workload(args), bench.workload(args)
    assert a == b and a != bench.workload(Namespace(**{**vars(args), "seed": 4}))
    assert all(5 <= len(ids) <= 9 and 2 <= n <= 4 and max(ids) < 97 for _, ids, n in a)
    arrivals = [t for t, _, _ in a]
    assert arrivals == sorted(arrivals) and 50 / arrivals[-1] == pytest.approx(20.0, rel=0.4)


def test_synthetic_tokenizer_has_the_model_vocabulary(bench):
    tok = bench.synthetic_tokenizer(1000)
    assert tok.vocab_size == 1000 and tok.eot_id == 999
    text = tok.decode(range(256 + 32 * 95, 1000 - 1))  # merged tokens are printable ASCII
    assert text.isascii() and text.isprintable()
