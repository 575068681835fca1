"""Executor contract: exact artifacts, global dedup across tasks, resume after a kill, 1 == 2 workers."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.data.executor import PipelineConfig, load_pipeline, run_pipeline
from lmforge.data.pipeline import StepSpec
from lmforge.errors import ConfigError


def write_jsonl(path, texts, prefix):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def read_docs(out, sub="documents"):
    docs = []
    for p in sorted((Path(out) / sub).glob("rank_*.jsonl.gz")):
        with gzip.open(p, "rt") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ["alpha one\nshared boiler line\nalpha two", "same doc", "only a"], "a")
    write_jsonl(d / "b.jsonl", ["beta one\nshared boiler line", "same doc", "b line\nonly a"], "b")
    write_jsonl(d / "c.jsonl", ["gamma\nshared boiler line", "c unique", "same doc"], "c")
    return d


def config(inputs, out, steps, **kw):
    return PipelineConfig(input=[str(inputs)], output_dir=str(out), steps=[StepSpec(*s) for s in steps], **kw)


def test_exact_artifacts_and_global_dedup_across_files(inputs, tmp_path):
    out = tmp_path / "out"
    cfg = config(inputs, out, [("exact_dedup", {}), ("line_dedup", {"partitions": 3}),
                               ("write_jsonl", {"compression": "gz"})], tasks=3, write_excluded=True)
    stats = run_pipeline(cfg)
    docs = read_docs(out)
    # "same doc" survives once (first task's copy); every line that occurs twice anywhere is gone,
    # in every copy; documents left empty are dropped.
    assert [(d["id"], d["text"]) for d in docs] == [
        ("a0", "alpha one\nalpha two"), ("a1", "same doc"),
        ("b0", "beta one"), ("b2", "b line"),
        ("c0", "gamma"), ("c1", "c unique")]
    assert stats["exact_dedup"].dropped == {"duplicate": 2}
    assert stats["line_dedup"].dropped == {"empty_after_line_dedup": 1}  # a2 "only a" (also in b2)
    assert stats["line_dedup"].counters == {"lines_removed": 5, "duplicated_lines": 2}
    assert stats["write_jsonl"].docs_out == 6
    expected = {"pipeline.json", "stats.json"}
    for stage in range(3):
        for r in range(3):
            expected |= {f"completions/stage_{stage}/rank_{r:05d}", f"stats/stage_{stage}/rank_{r:05d}.json"}
        if stage < 2:
            expected |= {f"completions/stage_{stage}/plan.json"} | {
                f"work/stage_{stage}/rank_{r:05d}.jsonl" for r in range(3)}
    expected |= {f"documents/rank_{r:05d}.jsonl.gz" for r in range(3)}
    expected |= {f"work/exact_dedup/{k}/rank_{r:05d}.npy" for k in ("hashes", "drops") for r in range(3)}
    expected |= {f"work/line_dedup/counts/rank_{r:05d}.npy" for r in range(3)} | {"work/line_dedup/dups/rank_00000.npy"}
    expected |= {"excluded/exact_dedup/rank_00001.jsonl.gz", "excluded/exact_dedup/rank_00002.jsonl.gz",
                 "excluded/line_dedup/rank_00000.jsonl.gz"}
    assert set(files(out)) == expected
    with gzip.open(out / "excluded/exact_dedup/rank_00001.jsonl.gz", "rt") as f:
        rec = json.loads(f.read())
    assert rec["id"] == "b1" and rec["filter_reason"] == "exact_dedup:duplicate"


def test_one_and_two_workers_give_identical_outputs(inputs, tmp_path):
    steps = [("length", {"min_chars": 6}), ("pii", {}), ("minhash_dedup", {"ngram": 2, "num_hashes": 16, "bands": 8}),
             ("write_jsonl", {"compression": "none"}), ("tokenize", {"tokenizer": "bytes"})]
    run_pipeline(config(inputs, tmp_path / "w1", steps, tasks=3, workers=1))
    run_pipeline(config(inputs, tmp_path / "w2", steps, tasks=3, workers=2))
    for rel in files(tmp_path / "w1"):
        if rel.startswith(("documents/", "tokens/")):
            assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel
    assert files(tmp_path / "w1") == files(tmp_path / "w2")


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from lmforge.data.pipeline import PipelineStep, register
    from lmforge.data.executor import load_pipeline, run_pipeline

    @register("crash_once")
    class CrashOnce(PipelineStep):
        def run(self, docs, rank=0, world=1):
            for i, doc in enumerate(super().run(docs, rank, world)):
                if rank == 1 and i == 1 and os.environ.get("CRASH"):
                    os._exit(17)  # like kill -9: no cleanup, no exception handlers
                yield doc

    run_pipeline(load_pipeline(sys.argv[1], ["output_dir=" + sys.argv[2]]))
""")


def test_resume_after_killed_task_gives_identical_output(inputs, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(CRASH_SCRIPT)
    toml = tmp_path / "p.toml"
    toml.write_text(textwrap.dedent(f"""
        input = ["{inputs}"]
        output_dir = "unused"
        tasks = 3
        [[steps]]
        name = "exact_dedup"
        [[steps]]
        name = "crash_once"
        [[steps]]
        name = "write_jsonl"
        [[steps]]
        name = "tokenize"
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    subprocess.run([sys.executable, str(script), str(toml), str(clean)], env=env, check=True)
    r = subprocess.run([sys.executable, str(script), str(toml), str(resumed)], env={**env, "CRASH": "1"})
    assert r.returncode == 17
    assert (resumed / "completions/stage_1/rank_00000").exists()
    assert not (resumed / "completions/stage_1/rank_00001").exists()
    assert not (resumed / "documents/rank_00001.jsonl.gz").exists()  # nothing half-written under a final name
    before = (resumed / "completions/stage_1/rank_00000").stat().st_mtime_ns
    subprocess.run([sys.executable, str(script), str(toml), str(resumed)], env=env, check=True)
    assert (resumed / "completions/stage_1/rank_00000").stat().st_mtime_ns == before  # not rerun
    for rel in files(clean):
        if rel.startswith(("documents/", "tokens/")) or rel == "stats.json":
            assert (clean / rel).read_bytes() == (resumed / rel).read_bytes() or rel == "stats.json", rel
    a, b = json.loads((clean / "stats.json").read_text()), json.loads((resumed / "stats.json").read_text())
    for label in a:
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "dropped", "counters"):
            assert a[label][k] == b[label][k], (label, k)
    assert {p for p in files(resumed) if not p.startswith(".") and "/." not in p} == set(files(clean))


def test_pipeline_toml_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('input = ["x"]\noutput_dir = "o"\n[[steps]]\nname = "gopher_qualty"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: steps\[0\]: unknown step 'gopher_qualty'"):
        load_pipeline(bad)
    bad.write_text('input = ["x"]\noutput_dir = "o"\n[[steps]]\nname = "gopher_quality"\nargs = {min_words = "many"}\n')
    with pytest.raises(ConfigError, match=r"steps\[0\].args.min_words' = 'many' is not a valid int"):
        load_pipeline(bad)
    bad.write_text('input = ["x"]\noutput_dir = "o"\n[[steps]]\nname = "fineweb"\nargs = {max_short = 1}\n')
    with pytest.raises(ConfigError, match=r"unknown key 'steps\[0\].args.max_short'"):
        load_pipeline(bad)


@pytest.mark.slow  # starting Ray takes 10-50 s on 2 shared cores
def test_ray_executor_matches_local(inputs, tmp_path):
    ray = pytest.importorskip("ray")
    steps = [("exact_dedup", {}), ("write_jsonl", {"compression": "none"})]
    run_pipeline(config(inputs, tmp_path / "local", steps, tasks=3))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_pipeline(config(inputs, tmp_path / "ray", steps, tasks=3, workers=2, executor="ray"))
    finally:
        ray.shutdown()
    assert files(tmp_path / "local") == files(tmp_path / "ray")
    for rel in files(tmp_path / "local"):
        if rel.startswith("documents/"):
            assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes()


def test_failing_task_leaves_no_outputs_or_temporary_files(inputs, tmp_path):
    from lmforge.data.pipeline import STEPS, PipelineStep, register
    from lmforge.errors import DataError

    @register("fail_on_b")
    class FailOnB(PipelineStep):
        def process(self, doc):
            if doc.id.startswith("b"):
                raise DataError(f"bad document {doc.id}")
            return doc

    try:
        cfg = config(inputs, tmp_path / "out", [("write_jsonl", {}), ("tokenize", {}), ("fail_on_b", {})], tasks=3)
        with pytest.raises(DataError, match="bad document b0"):
            run_pipeline(cfg, progress=False)
    finally:
        del STEPS["fail_on_b"]
    out = tmp_path / "out"
    assert (out / "completions/stage_0/rank_00000").exists()  # task 0 finished before task 1 failed
    assert not (out / "completions/stage_0/rank_00001").exists()
    assert sorted(p.name for p in (out / "documents").iterdir()) == ["rank_00000.jsonl.gz"]
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["rank_00000.bin", "rank_00000.json"]


def test_resuming_with_a_different_pipeline_is_refused(inputs, tmp_path):
    steps = [("write_jsonl", {})]
    run_pipeline(config(inputs, tmp_path / "out", steps, tasks=2), progress=False)
    run_pipeline(config(inputs, tmp_path / "out", steps, tasks=2, workers=2), progress=False)  # fine
    with pytest.raises(ConfigError, match=r"different pipeline \(differs in: steps, tasks\)"):
        run_pipeline(config(inputs, tmp_path / "out", [("length", {})] + steps, tasks=3), progress=False)
