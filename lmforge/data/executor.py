"""Run a pipeline TOML over its inputs: tasks, stages, completion markers, stats, local or Ray.

A pipeline file (see `docs/data.md`) names inputs, an output directory, a task count and a list
of `[[steps]]`. Inputs are split into `tasks` tasks (whole files per task when there are at least
as many files as tasks, else every task reads all files and takes every tasks-th document). Global
steps (dedup) cut the step list into stages:

    stage 0: read inputs → steps … → G1.observe → work/stage_0/rank_N.jsonl
    (G1.plan, once, over all tasks)
    stage 1: read work/stage_0 → G1 drops → steps … → outputs

For every (stage, task) the executor runs the steps, commits their outputs (atomic renames), writes
`stats/stage_S/rank_N.json`, and only then `completions/stage_S/rank_N`. A rerun skips tasks that
have a marker, so a killed job resumes where it stopped and produces the same files as an
uninterrupted run. Per-stage stats are merged into `stats.json` at the end.

`LocalExecutor` uses worker processes (`workers`); `RayExecutor` runs the same tasks on Ray actors,
each of which builds the pipeline once (so steps that hold a model load it once per actor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from lmforge.config import load as load_config
from lmforge.data.pipeline import Filter, GlobalStep, PipelineStep, StepSpec, StepStats, build_step
from lmforge.data.readers import expand_inputs, read_input
from lmforge.data.sources import Corpus, Document
from lmforge.errors import ConfigError, DataError
from lmforge.io import read_json, write_json, write_text


@dataclasses.dataclass
class PipelineConfig:
    input: list[str]
    output_dir: str
    steps: list[StepSpec] = dataclasses.field(default_factory=list)
    name: str = "pipeline"
    tasks: int = 1
    workers: int = 1
    executor: Literal["local", "ray"] = "local"
    text_field: str = "text"
    write_excluded: bool = False

    def __post_init__(self):
        if self.tasks < 1 or self.workers < 1:
            raise ConfigError(f"pipeline '{self.name}': tasks and workers must be ≥ 1 "
                              f"(got tasks={self.tasks}, workers={self.workers})")
        if not self.steps:
            raise ConfigError(f"pipeline '{self.name}': no [[steps]]")
        labels = [s.label or s.name for s in self.steps]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ConfigError(f"pipeline '{self.name}': step label(s) {sorted(dup)} used twice; "
                              "give repeated steps distinct `label`s")


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    cfg = load_config(PipelineConfig, path, overrides)
    for i, spec in enumerate(cfg.steps):  # fail on bad step names/args before any work starts
        build_step(spec, str(path), i)
    return cfg


def build_steps(cfg: PipelineConfig, source: str = "pipeline") -> list[PipelineStep]:
    steps = [build_step(spec, source, i) for i, spec in enumerate(cfg.steps)]
    out = Path(cfg.output_dir)
    for step in steps:
        step.output_root = out
        step.workdir = out / "work" / step.label
    return steps


def split_stages(steps: list[PipelineStep]) -> list[list[PipelineStep]]:
    """Segments of steps; every segment but the last ends with a GlobalStep."""
    stages, cur = [], []
    for step in steps:
        cur.append(step)
        if isinstance(step, GlobalStep):
            stages.append(cur)
            cur = []
    stages.append(cur)
    return stages


def _read_work(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield Document(r.pop("text"), r.pop("id"), source=r.pop("source", ""), meta=r)


class Worker:
    """Runs (stage, task) units of one pipeline; a process or Ray actor holds one Worker."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.steps = build_steps(cfg)
        self.stages = split_stages(self.steps)
        from lmforge.data.example import EXAMPLE_INPUT, make_example_input

        spec = []
        for entry in cfg.input:
            if entry == EXAMPLE_INPUT:
                spec.extend(str(p) for p in make_example_input(self.out / "input"))
            else:
                spec.append(entry)
        self.files = expand_inputs(spec)

    def marker(self, stage: int, rank: int) -> Path:
        return self.out / "completions" / f"stage_{stage}" / f"rank_{rank:05d}"

    def _inputs(self, stage: int, rank: int) -> Iterator[Document]:
        if stage > 0:
            path = self.out / "work" / f"stage_{stage - 1}" / f"rank_{rank:05d}.jsonl"
            if not path.exists():
                raise DataError(f"stage {stage} task {rank}: intermediate file {path} is missing; "
                                f"delete {self.out / 'completions'} to rerun from scratch")
            yield from _read_work(path)
            return
        n = self.cfg.tasks
        if len(self.files) >= n:
            for path in self.files[rank::n]:
                yield from self._read(path)
        else:
            i = 0
            for path in self.files:
                for doc in self._read(path):
                    if i % n == rank:
                        yield doc
                    i += 1

    def _read(self, path: str) -> Iterator[Document]:
        if path == "embedded":
            yield from Corpus("embedded")
        else:
            yield from read_input(path, self.cfg.text_field)

    def run_task(self, stage: int, rank: int) -> dict | None:
        """Run one (stage, task) unless its marker exists; returns documents in/out, or None if
        the task was skipped (already complete)."""
        if self.marker(stage, rank).exists():
            return None
        from lmforge.data.writers import JsonlSink

        segment = self.stages[stage]
        prev = self.stages[stage - 1][-1] if stage > 0 else None
        active = ([prev] if prev is not None else []) + segment
        sinks: dict[str, JsonlSink] = {}
        for step in active:
            step.stats = StepStats()
            step.start(rank)
            if self.cfg.write_excluded and isinstance(step, Filter):
                def exclude(doc, label, _rank=rank):
                    if label not in sinks:
                        sinks[label] = JsonlSink(self.out / "excluded" / label / f"rank_{_rank:05d}.jsonl.gz", "gz")
                    sinks[label].write(doc)
                step.exclusion = exclude
        docs = self._inputs(stage, rank)
        if prev is not None:
            docs = prev.run(docs, rank, self.cfg.tasks)
        work = None
        for step in segment:
            if isinstance(step, GlobalStep):
                docs = step.observe(docs, rank, self.cfg.tasks)
                work = JsonlSink(self.out / "work" / f"stage_{stage}" / f"rank_{rank:05d}.jsonl")
            else:
                docs = step.run(docs, rank, self.cfg.tasks)
        n_out = 0
        try:
            for doc in docs:
                n_out += 1
                if work is not None:
                    work.write(doc)
        except BaseException:
            for sink in list(sinks.values()) + ([work] if work else []):
                sink.abort()
            for step in active:
                step.abort()
            raise
        for step in active:
            step.close()
        for sink in list(sinks.values()) + ([work] if work else []):
            sink.commit()
        stats = {step.label: step.stats.to_dict() for step in active}
        write_json(self.out / "stats" / f"stage_{stage}" / f"rank_{rank:05d}.json", stats)
        write_text(self.marker(stage, rank), "done\n")
        return {"docs_in": next(iter(stats.values()))["docs_in"] if stats else 0, "docs_out": n_out}

    def plan(self, stage: int) -> dict:
        """Run the global step that closes `stage` (once, after all its tasks); idempotent."""
        step = self.stages[stage][-1]
        done = self.out / "completions" / f"stage_{stage}" / "plan.json"
        if done.exists():
            return read_json(done)
        counters = step.plan(self.cfg.tasks)
        write_json(done, counters)
        return counters


def merge_stats(cfg: PipelineConfig) -> dict[str, StepStats]:
    """Merge every task's stats (and global plans' counters) into one StepStats per step."""
    out = Path(cfg.output_dir)
    merged: dict[str, StepStats] = {(s.label or s.name): StepStats() for s in cfg.steps}
    for path in sorted((out / "stats").glob("stage_*/rank_*.json")):
        for label, d in read_json(path).items():
            merged.setdefault(label, StepStats()).merge(StepStats.from_dict(d))
    for path in sorted((out / "completions").glob("stage_*/plan.json")):
        stage = int(path.parent.name.split("_")[1])
        label = split_stages_labels(cfg)[stage]
        for k, v in read_json(path).items():
            merged[label].counters[k] = merged[label].counters.get(k, 0) + v
    return merged


def split_stages_labels(cfg: PipelineConfig) -> list[str]:
    import lmforge.data.steps  # noqa: F401
    from lmforge.data.pipeline import STEPS

    return [(s.label or s.name) for s in cfg.steps if issubclass(STEPS[s.name], GlobalStep)]


class LocalExecutor:
    """Tasks in `workers` local processes (inline when workers = 1)."""

    def __init__(self, cfg: PipelineConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress

    def run(self) -> dict[str, StepStats]:
        cfg = self.cfg
        _check_same_pipeline(cfg)
        driver = Worker(cfg)
        write_json(Path(cfg.output_dir) / "pipeline.json", _to_plain(cfg))
        for stage in range(len(driver.stages)):
            todo = [r for r in range(cfg.tasks) if not driver.marker(stage, r).exists()]
            if todo:
                self._run_stage(driver, stage, todo)
            if stage < len(driver.stages) - 1:
                driver.plan(stage)
        stats = merge_stats(cfg)
        write_json(Path(cfg.output_dir) / "stats.json", {k: v.to_dict() for k, v in stats.items()})
        return stats

    def _report(self, stage: int, rank: int, stats: dict | None, n_stages: int) -> None:
        """One progress line per finished task, on stderr (stdout is left for the stats table)."""
        if stats is None or not self.progress:
            return
        print(f"[{self.cfg.name}] stage {stage + 1}/{n_stages} task {rank + 1}/{self.cfg.tasks}: "
              f"{stats['docs_in']} docs in, {stats['docs_out']} out", file=sys.stderr, flush=True)

    def _run_stage(self, driver: Worker, stage: int, ranks: list[int]) -> None:
        n = len(driver.stages)
        if self.cfg.workers == 1 or len(ranks) == 1:
            for r in ranks:
                self._report(stage, r, driver.run_task(stage, r), n)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # A worker that dies (killed, out of memory) raises BrokenProcessPool here instead of hanging;
        # the tasks that finished have their markers, so a rerun resumes from there.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(self.cfg.workers, len(ranks)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(self.cfg,)) as pool:
            for r, stats in zip(ranks, pool.map(_run_in_worker, [(stage, r) for r in ranks])):
                self._report(stage, r, stats, n)


def _check_same_pipeline(cfg: PipelineConfig) -> None:
    """Resuming is only sound for the same pipeline: refuse an output_dir that holds another one
    (workers and executor may change between runs; they do not change the outputs)."""
    path = Path(cfg.output_dir) / "pipeline.json"
    if not path.exists():
        return
    old, new = read_json(path, "pipeline record"), json.loads(json.dumps(_to_plain(cfg)))  # tuples → lists
    for d in (old, new):
        d.pop("workers", None)
        d.pop("executor", None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"{cfg.output_dir} holds the outputs of a different pipeline (differs in: "
                          f"{', '.join(diff)}); resume with the same pipeline, or use a new output_dir")


_WORKER: Worker | None = None


def _init_worker(cfg: PipelineConfig) -> None:
    global _WORKER
    _WORKER = Worker(cfg)


def _run_in_worker(args: tuple[int, int]) -> dict | None:
    assert _WORKER is not None
    return _WORKER.run_task(*args)


def _to_plain(cfg: PipelineConfig) -> dict:
    from lmforge.config import to_dict

    return to_dict(cfg)


class RayExecutor(LocalExecutor):
    """The same tasks on Ray actors (`ray.init()` connects to a running cluster, or starts one)."""

    def __init__(self, cfg: PipelineConfig, ray_init: dict | None = None, progress: bool = True):
        super().__init__(cfg, progress)
        self.ray_init = ray_init or {}

    def _run_stage(self, driver: Worker, stage: int, ranks: list[int]) -> None:
        from lmforge.errors import require

        ray = require("ray", "the Ray executor", extra="ray")
        from ray.util import ActorPool

        if not ray.is_initialized():
            ray.init(**self.ray_init)
        actor = ray.remote(_RayWorker)
        actors = [actor.remote(self.cfg) for _ in range(min(self.cfg.workers, len(ranks)))]
        pool = ActorPool(actors)
        for r, done in zip(ranks, pool.map(lambda a, r: a.run_task.remote(stage, r), ranks)):
            if done and self.progress:
                print(f"[{self.cfg.name}] stage {stage + 1}/{len(driver.stages)} task {r + 1}/{self.cfg.tasks} "
                      "done (ray)", file=sys.stderr, flush=True)
        for a in actors:
            ray.kill(a)


class _RayWorker:
    def __init__(self, cfg: PipelineConfig):
        self.worker = Worker(cfg)

    def run_task(self, stage: int, rank: int) -> bool:
        return self.worker.run_task(stage, rank) is not None


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> dict[str, StepStats]:
    executor = RayExecutor(cfg, progress=progress) if cfg.executor == "ray" else LocalExecutor(cfg, progress)
    return executor.run()
