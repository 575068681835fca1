"""The main job: corpus -> tokenizer -> token shards -> trained model -> evaluation -> samples ->
report.html, in one run directory, with one command (`lmforge run`).

Each stage writes its artifact and then a marker `run_dir/stages/<stage>.json` recording what it was
made from (the relevant config and the upstream artifact's identity). A rerun skips every stage whose
marker matches and whose artifact is still there, and redoes a stage (and everything after it) when
its inputs changed. Training resumes from its latest checkpoint when interrupted.

Layout: run_dir/{config.toml, tokenizer/, data/{train,val}.{bin,json}, checkpoints/step_N/,
metrics.jsonl, eval.json, samples.jsonl, report.html, stages/}.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lmforge.config import to_dict
from lmforge.io import read_json, write_json
from lmforge.train.pretrain import RunConfig, pretrain, sample_texts


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Markers that say which stages are done and from what inputs."""

    def __init__(self, run_dir: Path, log=print):
        self.dir = run_dir / "stages"
        self.log = log

    def done(self, name: str, inputs: dict, artifacts: list[Path]) -> bool:
        path = self.dir / f"{name}.json"
        if not path.exists() or not all(p.exists() for p in artifacts):
            return False
        try:
            marker = read_json(path)
        except Exception:
            return False
        if marker.get("inputs") != _digest(inputs):
            self.log(f"[{name}] inputs changed since the last run: redoing it")
            return False
        self.log(f"[{name}] up to date, skipped ({path})")
        return True

    def mark(self, name: str, inputs: dict, result: dict) -> None:
        write_json(self.dir / f"{name}.json", {"inputs": _digest(inputs), "result": result,
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def result(self, name: str) -> dict:
        return read_json(self.dir / f"{name}.json").get("result", {})


def _corpus(cfg: RunConfig, split):
    from lmforge.data.sources import Corpus

    return Corpus(cfg.data.corpus, split=split, text_field=cfg.data.text_field)


def stage_tokenizer(cfg: RunConfig, run_dir: Path, stages: Stages):
    from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path, backend="auto")
        stages.log(f"[tokenizer] using {cfg.tokenizer.path} ({tok.vocab_size} tokens)")
        return tok
    out = run_dir / "tokenizer"
    inputs = {"tokenizer": to_dict(cfg.tokenizer), "corpus": cfg.data.corpus, "field": cfg.data.text_field}
    if not stages.done("tokenizer", inputs, [out / "tokenizer.json"]):
        start = time.perf_counter()
        stages.log(f"[tokenizer] training a {cfg.tokenizer.vocab_size}-token BPE on {cfg.data.corpus}")
        tok = train_bpe(_corpus(cfg, "train").texts(), cfg.tokenizer.vocab_size, pattern=cfg.tokenizer.pattern,
                        workers=cfg.data.workers or None, progress=cfg.train.progress)
        save_tokenizer(tok, out)
        stages.mark("tokenizer", inputs, {"hash": tok.hash, "seconds": round(time.perf_counter() - start, 1)})
    return load_tokenizer(out, backend="auto")


def stage_shards(cfg: RunConfig, run_dir: Path, stages: Stages, tok) -> tuple[Path, Path]:
    from lmforge.tokenizer.shards import encode_corpus_to_shard

    data = run_dir / "data"
    paths = {split: data / split for split in ("train", "val")}
    inputs = {"tokenizer": tok.hash, "corpus": cfg.data.corpus, "field": cfg.data.text_field}
    files = [p.with_name(p.name + ext) for p in paths.values() for ext in (".bin", ".json")]
    if not stages.done("shards", inputs, files):
        result = {}
        for split, path in paths.items():
            info = encode_corpus_to_shard(tok, _corpus(cfg, split).texts(), path,
                                          workers=cfg.data.workers or os.cpu_count() or 1,
                                          desc=f"encode {split}", progress=cfg.train.progress,
                                          meta={"split": split, "corpus": cfg.data.corpus})
            stages.log(f"[shards] {split}: {info['documents']} documents, {info['tokens']} tokens, "
                       f"{info['mb']:.1f} MB in {info['seconds']:.1f}s")
            result[split] = {k: info[k] for k in ("documents", "tokens", "mb", "seconds")}
        stages.mark("shards", inputs, result)
    return paths["train"], paths["val"]


def run_main_job(cfg: RunConfig, run_dir: str | Path, log=print) -> dict:
    """Run every stage of the main job (skipping those already done); returns the evaluation."""
    from lmforge.model.checkpoint import load_weights
    from lmforge.train.checkpoint import list_checkpoints
    from lmforge.train.report import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir, log)
    job_start = time.perf_counter()
    tok = stage_tokenizer(cfg, run_dir, stages)
    # The model's vocabulary is the tokenizer's, padded to a multiple of 64 (faster matmuls; the
    # padded rows are never targets).
    vocab = -(-tok.vocab_size // 64) * 64
    if cfg.model.vocab_size != vocab:
        log(f"[model] vocab_size {cfg.model.vocab_size} -> {vocab} (the tokenizer's {tok.vocab_size}, padded)")
    cfg.model = cfg.model.replace(vocab_size=vocab)
    train_path, val_path = stage_shards(cfg, run_dir, stages, tok)
    cfg.data.train_shards, cfg.data.val_shards = str(train_path), str(val_path)

    # time budgets decide when a run stops, not what it computes: they are not inputs
    train_inputs = {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "tokenizer": tok.hash,
                    "train": {k: v for k, v in to_dict(cfg.train).items() if k != "time_budget_s"}}
    if cfg.job_budget_s:
        left = cfg.job_budget_s - (time.perf_counter() - job_start) - 60.0
        budget = min(cfg.train.time_budget_s or float("inf"), max(left, 30.0))
        if budget != (cfg.train.time_budget_s or float("inf")):
            log(f"[train] time budget {budget:.0f}s (job budget {cfg.job_budget_s:.0f}s)")
        cfg.train.time_budget_s = budget
    final = list_checkpoints(run_dir / "checkpoints")
    if not stages.done("train", train_inputs, [final[-1]] if final else [run_dir / "missing"]):
        log(f"[train] {cfg.train.max_steps} steps (time budget {cfg.train.time_budget_s}s) -> {run_dir}")
        summary = pretrain(cfg, run_dir, resume=True, tokenizer=tok)
        model = summary.pop("model")
        trainer = summary.pop("trainer")
        evaluation = summary.pop("final_eval")
        write_json(run_dir / "eval.json", {"step": trainer.step, **evaluation})
        stages.mark("train", train_inputs, summary)
    else:
        from lmforge.model import Transformer

        model = Transformer(cfg.model)
        load_weights(list_checkpoints(run_dir / "checkpoints")[-1], model)
    evaluation = read_json(run_dir / "eval.json")
    if "val_bpb" in evaluation:
        log(f"[eval] val loss {evaluation['val_loss']:.4f}, {evaluation['val_bpb']:.4f} bits/byte; unigram "
            f"baseline {evaluation.get('unigram_loss', float('nan')):.4f}, "
            f"{evaluation.get('unigram_bpb', float('nan')):.4f} bits/byte")

    sample_inputs = {"train": stages.result("train"), "sample": to_dict(cfg.sample)}
    if not stages.done("samples", sample_inputs, [run_dir / "samples.jsonl"]):
        samples = sample_texts(model, tok, cfg)
        with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"step": evaluation.get("step"), **s}) + "\n")
        stages.mark("samples", sample_inputs, {"n": len(samples)})
    for s in [json.loads(line) for line in open(run_dir / "samples.jsonl", encoding="utf-8")][:3]:
        log(f"[sample] {s['prompt']!r} -> {s['completion'][:120]!r}")

    report = write_report(run_dir, cfg, stages)
    log(f"[report] {report} (main job took {time.perf_counter() - job_start:.0f}s this time)")
    return evaluation
