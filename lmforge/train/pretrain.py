"""Pretraining from a run config: build the model, optimizer, loaders, evaluation and sampling, and
hand them to the Trainer. `lmforge train` calls `pretrain`; the main job (run.py) calls it between
its data and report stages.

`RunConfig` composes the sections of a run: model (lmforge.model.ModelConfig), tokenizer, data,
train (TrainConfig) and sample. Its defaults are the tiny CPU main job on the embedded corpus.
The resolved config is saved as run_dir/config.toml.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import save_toml, to_dict
from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig

# The main job's model: ~1.9M parameters, 128-token context (short rows: more updates per CPU-second,
# which is what a few minutes on 2 CPU cores is short of). A run config's [model] table may name
# `preset = "<lmforge.model preset>"` instead.
TINY_MODEL = dict(vocab_size=4096, context_length=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2)


# The main job's training defaults beyond TrainConfig's: Muon (far fewer tokens to a given loss, see
# docs/benchmarks.md); random windows (the embedded corpus is sorted by path, so walking it in order
# would feed one kind of file after another; doc_ids/positions still come from the BOS tokens); and a
# time budget that keeps it within minutes on a loaded laptop (0 in a preset turns the budget off).
MAIN_JOB_TRAIN = dict(optimizer="muon", sampler="random", max_steps=600, warmup_steps=20, time_budget_s=300.0)


def _tiny_model() -> ModelConfig:
    return ModelConfig(**TINY_MODEL)


@dataclass
class TokenizerSection:
    vocab_size: int = 4096
    pattern: str = "gpt2"
    path: str | None = None  # an existing tokenizer dir: use it instead of training one


@dataclass
class DataSection:
    corpus: list[str] = field(default_factory=lambda: ["embedded"])
    text_field: str = "text"
    train_shards: str | None = None  # shard dir or file (set by the main job; needed by `train`)
    val_shards: str | None = None
    workers: int = 0  # encoding processes; 0 = all cores


@dataclass
class SampleSection:
    prompts: list[str] = field(default_factory=lambda: ["def ", "class Parser:\n", "import "])
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=_tiny_model)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**MAIN_JOB_TRAIN))
    sample: SampleSection = field(default_factory=SampleSection)
    # `lmforge run` as a whole: training stops early (with a checkpoint) when continuing would leave
    # less than a minute for evaluation, sampling and the report. 0 = no limit.
    job_budget_s: float = 570.0


def load_run_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < preset TOML < dotted overrides. The [model] table starts from the tiny model, or
    from the lmforge.model preset it names with `preset = "..."`, and its other keys override that."""
    from lmforge.config import apply_overrides, from_dict, load_toml
    from lmforge.model.presets import PRESETS

    data = load_toml(preset) if preset else {}
    source = str(preset) if preset else "defaults"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    model_section = dict(data.pop("model", {}) or {})
    name = model_section.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise ConfigError(f"{source}: model.preset = {name!r} is not a model preset "
                          f"(known: {', '.join(sorted(PRESETS))})")
    base = dict(PRESETS[name]) if name else dict(TINY_MODEL)
    model = from_dict(ModelConfig, {**base, **model_section}, source, prefix="model.")
    data["train"] = {**MAIN_JOB_TRAIN, **(data.get("train") or {})}
    cfg = from_dict(RunConfig, data, source)
    cfg.model = model
    return cfg


def seq_len_of(cfg: RunConfig) -> int:
    seq = cfg.train.seq_len or cfg.model.context_length
    if seq > cfg.model.context_length:
        raise ConfigError(f"train.seq_len = {seq} is longer than model.context_length = "
                          f"{cfg.model.context_length}")
    return seq


def make_batches(cfg: RunConfig, shards, seq_len: int, rank: int = 0, world_size: int = 1):
    from lmforge.data.loader import DocumentPacker, RandomWindowSampler, TokenStream

    stream = TokenStream(shards)
    if stream.vocab_size and stream.vocab_size > cfg.model.vocab_size:
        raise DataError(f"shards {shards} hold ids up to vocab {stream.vocab_size}, more than "
                        f"model.vocab_size = {cfg.model.vocab_size}")
    t = cfg.train
    if t.sampler == "random":
        return RandomWindowSampler(stream, t.batch_size, seq_len, seed=t.seed, rank=rank,
                                   world_size=world_size, document_mask=t.document_mask)
    packer = DocumentPacker(stream, t.batch_size, seq_len, rank=rank, world_size=world_size,
                            shuffle=t.shuffle_documents, seed=t.seed)
    if t.document_mask:
        return packer
    return _DropKeys(packer, ("doc_ids", "positions"))


class _DropKeys:
    """A batch builder without some keys (e.g. packed rows without document masking)."""

    def __init__(self, inner, keys):
        self.inner, self.keys = inner, keys

    def __iter__(self):
        return self

    def __next__(self):
        return {k: v for k, v in next(self.inner).items() if k not in self.keys}

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def evaluate_lm(model, batches, device, token_bytes: torch.Tensor | None = None,
                unigram_logp: torch.Tensor | None = None) -> dict:
    """Mean CE per token over `batches`, bits per byte (if token_bytes), and the same for the unigram
    baseline on the same targets (if unigram_logp). Run under no_grad by the caller."""
    from lmforge.data.loader import to_device
    from lmforge.train.metrics import bits_per_byte

    ce = 0.0
    n = 0
    n_bytes = 0
    uni = 0.0
    for batch in batches:
        batch = to_device(batch, device)
        kwargs = {k: batch[k] for k in ("positions", "doc_ids") if k in batch}
        out = model(batch["input_ids"], batch["targets"], **kwargs)
        ce += out.ce_sum.float().item()
        n += int(out.n_tokens)
        targets = batch["targets"][batch["targets"] != -100].cpu()
        if token_bytes is not None:
            n_bytes += int(token_bytes[targets].sum())
        if unigram_logp is not None:
            uni -= float(unigram_logp[targets].sum())
    if n == 0:
        raise DataError("evaluation saw no target tokens (is the validation shard empty?)")
    result = {"val_loss": ce / n, "val_tokens": n}
    if token_bytes is not None:
        result["val_bpb"] = bits_per_byte(ce, n_bytes)
        result["val_bytes"] = n_bytes
    if unigram_logp is not None:
        result["unigram_loss"] = uni / n
        if token_bytes is not None:
            result["unigram_bpb"] = bits_per_byte(uni, n_bytes)
    return result


def pretrain(cfg: RunConfig, run_dir: str | Path, resume: bool = True, tokenizer=None,
             parallelize=None) -> dict:
    """Train the model of `cfg` on its shards, writing checkpoints, metrics.jsonl and config.toml to
    run_dir. Resumes from the latest checkpoint there when `resume`. Returns the trainer's summary
    plus the final evaluation. `parallelize(cfg, model, optimizer, batches) -> (optimizer, batches,
    parallel)` (from lmforge.distributed.launch) makes the run data-parallel."""
    from lmforge.data.loader import DocumentPacker, Prefetcher, TokenStream
    from lmforge.model import Transformer, flops_per_token
    from lmforge.train.metrics import token_byte_lengths, unigram_log_probs
    from lmforge.train.optim import optimizer_from_config
    from lmforge.train.trainer import Trainer, lm_loss, resolve_device

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is not set: give the shard directory written by "
                          "`lmforge tokenizer encode` (or use `lmforge run`, which makes it)")
    save_toml(cfg, run_dir / "config.toml")
    device = resolve_device(t.device)
    seq_len = seq_len_of(cfg)
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = optimizer_from_config(model, t, cfg.model.vocab_size)
    batches = make_batches(cfg, cfg.data.train_shards, seq_len)
    parallel = None
    if parallelize is not None:
        optimizer, batches, parallel = parallelize(cfg, model, optimizer, batches)
    if device.type == "cuda":
        batches = Prefetcher(batches, device)

    token_bytes = unigram = None
    if tokenizer is not None:
        token_bytes = token_byte_lengths(tokenizer, cfg.model.vocab_size)
        train_stream = TokenStream(cfg.data.train_shards)
        unigram = unigram_log_probs(train_stream.read(0, train_stream.total), cfg.model.vocab_size)

    evaluate = None
    if cfg.data.val_shards:
        val_stream = TokenStream(cfg.data.val_shards)

        def evaluate(m):
            packer = DocumentPacker(val_stream, t.batch_size, seq_len, loop=False)
            eval_batches = (b for _, b in zip(range(t.eval_batches), packer))
            return evaluate_lm(m, eval_batches, device, token_bytes, unigram)

    sample = None
    if tokenizer is not None and cfg.sample.prompts:

        def sample(m):
            return sample_texts(m, tokenizer, cfg)

    trainer = Trainer(model, optimizer, batches, lm_loss, t, run_dir=run_dir, model_config=cfg.model,
                      evaluate=evaluate, sample=sample,
                      flops_per_token=flops_per_token(cfg.model, seq_len)["total"],
                      config_record={"run": to_dict(cfg)}, parallel=parallel)
    summary = trainer.train(resume=resume)
    final = trainer.last_eval
    if evaluate and (final is None or final["step"] != trainer.step):
        final = trainer.run_eval()
    summary["final_eval"] = {k: v for k, v in (final or {}).items() if k != "step"}
    summary["model"] = trainer.model
    summary["trainer"] = trainer
    return summary


def sample_texts(model, tokenizer, cfg: RunConfig) -> list[dict]:
    """One continuation per configured prompt, decoded (prompts start after a BOS token)."""
    from lmforge.train.generate import generate

    s = cfg.sample
    out = []
    for i, prompt in enumerate(s.prompts):
        ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
        start = time.perf_counter()
        new = generate(model, ids, s.max_new_tokens, context_length=cfg.model.context_length,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       stop_ids=[tokenizer.eot_id], seed=s.seed + i)
        out.append({"prompt": prompt, "completion": tokenizer.decode(new), "tokens": len(new),
                    "seconds": round(time.perf_counter() - start, 3)})
    return out


def write_samples(path: Path, samples: list[dict], step: int) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
