"""The inference engine: preallocated cache, prefill and decode, continuous batching.

    engine = Engine(model, tokenizer=tok, max_batch=8, max_len=1024)
    outs = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=50, temperature=0))
    # or, as a server does: engine.add_request(ids, params); while engine.has_work(): engine.step()

The engine owns a `StaticKVCache` with `max_batch` row slots. Each sequence lives in one slot; key
slot s of its row holds position s, so rows of different lengths decode together, each at its own
position (the model masks by per-row positions). `step()` is one scheduler iteration:
1. admit: waiting requests take free slots while there are enough (a request with n samples needs
   n); all prompts admitted in the step are prefilled in one forward whatever their slots (the
   cache view takes row ids; right-padded; padding writes land beyond the row's length, where the
   mask never looks; sliding-window rings: one forward per prompt); a request with n > 1 is
   prefilled once and its cache row copied to its other slots;
2. decode: every running sequence advances by one token in one batched forward over the rows
   0..(highest busy slot); when all rows sample with settings the device can apply alone
   (`sampling.fast_key`: no penalties, log-probs or seeds) this is the steady-state step below,
   `decode_steps` tokens per row at a time;
3. finished sequences (stop id, stop string, max_tokens, cache full, or aborted) free their slots
   at once, so waiting requests join at the next step while others keep decoding.
With `prefill_chunk=N`, step 1 feeds at most N prompt tokens per step (chunked prefill), so a
long prompt joining does not stall the running sequences for its whole prefill.
Tokens reach the host once per step (stop checks and streaming need them), never once per row.

The steady-state step (pipeline.py) reads each row's last token and position from device buffers,
samples on the device and writes the tokens back there: no tensor is built on the host and nothing
waits inside the step. While the same rows keep decoding (no admission, abort or chunked prefill
pending), `step()` launches step t+1 before it reads step t's tokens (pinned copy + CUDA event),
so the host's stop checks and streaming overlap the GPU. Tokens thus arrive one step late; a row
that stops at step t drops the token t+1 made for it (outputs are the same as unpipelined).

With `decode_steps=k` (default: 8 when compiled, else 1) a steady-state launch decodes k tokens
per row before the host reads them (multi-step scheduling): the host's work per launch is paid
once per k tokens; streaming gets k tokens at a time, a request waiting for a slot joins up to k
steps later, and a row that stops mid-launch drops the rest (outputs are the same for every k).

With `compile=True` on CUDA the decode runs at a fixed shape: the steady-state step (forward and
sampling) over all rows and an attended length rounded up to a power of two >= 256 is compiled by
inductor (no CUDA graphs of its own; `compile_options` are passed to it, e.g. `TUNED`) and its
k steps are captured in one plain CUDA graph
per length and sampling setting (pipeline.StepGraphs); the general decode step over all rows and
the whole cache is `torch.compile(mode="reduce-overhead")`; prefill forwards are compiled with
dynamic shapes, at shapes chosen so that one graph serves every admission (rows, prompt lengths,
slots, prefix hits; see `_prefill_batch`), compiled at the first admission; inductor adds one
more graph, compiled when first needed, for an admission that attends all max_len slots.

With `fused_decode` (None, the default: with compile=True on CUDA whenever supported; True: also
eager and under the Triton interpreter, for tests) the steady-state step's forward is fused_decode.FusedDecoder: four or
five Triton kernels per layer (norm+qkv+RoPE+cache write, attention, o+residual,
norm+gate/up+SwiGLU, down+residual) instead of the model's modules, for batches of up to
fused_decode.MAX_ROWS rows of a dense Llama-family model (anything else: the model, reason
logged). When compiled, its launches are captured in the same k-step CUDA graphs (not compiled by
inductor); sampling, prefill, speculative rounds and the general step are unchanged.

With `prefix_blocks=N` (prefix.py) an admitted request first copies the cached KV of the longest
known block-aligned prefix of its prompt into its row and prefills only the rest; prompts (after
prefill) and finished sequences are stored back, block by block, for later requests.

With `drafter=DraftModel(small) | NGramDrafter(n)` step 2 is a round of exact speculative decoding
instead (speculative.py): every running row gets up to `spec_k` drafts, the target scores all rows'
[pending, drafts] in one forward, each row keeps its accepted drafts plus one token and forgets the
rest of its cache. With `compile=True` the target's forward of a full round ([max_batch, spec_k + 1])
is a second CUDA graph; the draft model's forwards run eager.

With `pack=True` (the default) the engine packs the model it is given (`pack_projections`): each
layer's q/k/v, and the MLP's gate/up, become views of one buffer, one GEMM each. The parameters
stay the same objects, so whoever else holds the model (GRPO's trainer sharing its policy) keeps
working and its in-place updates reach the engine; `.to()` afterwards ends the packing (logged).

The engine works in token ids; text (detokenization, stop strings) goes through text.TextStream
when a tokenizer is given. It does not know about HTTP (server.py) or chat templates.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.inference.cache import StaticKVCache
from lmforge.inference.pipeline import DecodeBuffers, InFlight, StepGraphs
from lmforge.inference.prefix import PrefixCache
from lmforge.inference.requests import Completion, Event, Request, Sequence, completion
from lmforge.inference.sampling import Row, SamplingParams, fast_key, sample, sample_fast
from lmforge.inference.speculative import speculative_round
from lmforge.inference.text import TextStream
from lmforge.model.layers import PackedLinears
from lmforge.model.transformer import pack_projections

log = logging.getLogger(__name__)

# Inductor options for the steady-state step worth knowing (Engine(compile_options=...)):
# {"coordinate_descent_tuning": True} tunes its kernels' block sizes and, at batch 1, turns the
# matrix-vector products into fused Triton reductions instead of cuBLAS calls. Measured on an H100
# at batch 1 (benchmarks/inference_profile.py, llama124m): GPU time per step 0.62 -> 0.56 ms,
# 235 -> 175 kernels, but compilation took minutes instead of seconds, so it is not the default.
TUNED = {"coordinate_descent_tuning": True}


def _not_one_graph(e: Exception) -> bool:
    """Whether dynamo raised e under fullgraph because the function is not one graph."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(e, (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, GuardOnDataDependentSymNode))


class Engine:
    def __init__(self, model: nn.Module, *, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 eos_ids: list[int] | None = None, compile: bool = False, prefill_chunk: int | None = None,
                 drafter=None, spec_k: int = 4, prefix_blocks: int = 0, block_size: int = 16,
                 decode_steps: int | None = None, compile_options: dict | None = None, pack: bool = True,
                 fused_decode: bool | None = None):
        self.model = model.eval()
        # one GEMM for q/k/v and one for gate/up per layer; the parameters stay the same objects
        self.packed_layers = pack_projections(model) if pack else 0
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_len = max_len or model.cfg.context_length
        # prefix caching copies blocks by position, so it needs full-length rows (no rings)
        self.cache = StaticKVCache.for_model(model, max_batch, self.max_len, ring=not prefix_blocks)
        self.prefix = PrefixCache(self.cache, prefix_blocks, block_size) if prefix_blocks else None
        self.max_batch = max_batch
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk = {prefill_chunk} must be >= 1 (or None: whole prompts)")
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[Sequence] = []  # chunked prefill in progress, oldest first
        if eos_ids is None:
            eos_ids = [tokenizer.eot_id] if tokenizer is not None and tokenizer.eot_id is not None else []
        self.eos_ids = set(eos_ids)
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._pending_events: list[Event] = []
        self.compiled = compile and self.device.type == "cuda"
        self.decode_steps = decode_steps or (8 if self.compiled else 1)
        if self.decode_steps < 1:
            raise ConfigError(f"decode_steps = {decode_steps} must be >= 1")
        self.bufs = DecodeBuffers(max_batch, self.max_len, self.device, self.decode_steps)
        self.graphs = StepGraphs(self.bufs)  # the steady-state launches (CUDA graphs when compiled)
        self._inflight: InFlight | None = None  # a launched decode step whose tokens are unread
        if self.compiled:  # fixed addresses, so the CUDA graph may update the cache in place
            packed = [m.packed for m in model.modules() if isinstance(getattr(m, "packed", None), PackedLinears)]
            for t in [b for layer in self.cache.buffers for b in layer] + [
                    kp for kp in self.cache.key_positions if kp is not None] + [self.bufs.tokens, self.bufs.positions] + [
                    t for p in packed for t in (p.weight, p.bias) if t is not None]:  # plain tensors, not parameters
                torch._dynamo.mark_static_address(t)
        self.fused = self._fused_decoder(fused_decode)
        on = self.compiled
        # speculative rounds and rows that need `sample`
        self._decode_fn = torch.compile(self._forward_full, mode="reduce-overhead", dynamic=False) if on else None
        # the steady-state step (forward + sampling); StepGraphs captures decode_steps of it
        # (the fused step is Triton kernels already: captured as it is, not compiled)
        self._step_fn = (self._sample_step if self.fused is not None else
                         torch.compile(self._sample_step, dynamic=False, options=compile_options) if on else None)
        self._prefill_backend: dict = {}  # extra torch.compile arguments of the prefill (tests: the eager backend)
        self._prefill_fn = torch.compile(self._forward_from, dynamic=True, fullgraph=True) if on else None
        self.prefill_forwards = 0  # prefill forwards since start (admissions: one per step)
        self._prefill_warm = False  # whether _warm_prefill ran
        self._prefill_fullgraph = True  # False after a graph break (then compiled with breaks)
        self.drafter, self.spec_k = drafter, spec_k
        self.spec_stats = {"rounds": 0, "drafted": 0, "accepted": 0}  # over all rows since start
        if drafter is not None:
            if not 1 <= spec_k < self.cache.slack:  # rolled-back writes must stay within the ring's slack
                raise ConfigError(f"spec_k = {spec_k} must be in [1, {self.cache.slack})")
            drafter.start(model, max_batch, self.max_len)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ConfigError("the prompt is empty (pass at least one token, e.g. BOS)")
        V = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= V:
            raise ConfigError(f"prompt token ids must be in [0, {V}), got {min(prompt_ids)}..{max(prompt_ids)}")
        if len(prompt_ids) >= self.max_len:
            raise ConfigError(f"prompt of {len(prompt_ids)} tokens does not fit the context "
                              f"({self.max_len} tokens, at least one needed for the reply)")
        if params.n > self.max_batch:
            raise ConfigError(f"n = {params.n} samples exceeds the engine's max_batch = {self.max_batch}")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need an engine built with a tokenizer")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(prompt_ids), params)
        for i in range(params.n):
            row = Row.make(params, prompt_ids, self.device, seed_offset=i)
            text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
            req.sequences.append(Sequence(req, i, row, text=text))
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now (e.g. its client went away) and free its slots."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self.prefilling = [s for s in self.prefilling if s.request is not req]
        for s in req.sequences:
            if s.finish_reason is None:
                self._pending_events.append(self._finish(s, "abort"))
        self.requests.pop(request_id, None)

    def has_work(self) -> bool:
        return (bool(self.waiting) or any(s is not None for s in self.slots) or bool(self._pending_events)
                or self._inflight is not None)

    @property
    def n_running(self) -> int:
        return sum(s is not None for s in self.slots)

    # -- one scheduler step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events, self._pending_events = self._pending_events, []
        if self._inflight is not None:  # read the step launched last time
            prev, self._inflight = self._inflight, None
            if self._may_pipeline(prev):  # nothing to schedule: launch the next step first
                self._inflight = self._launch(prev.seqs, prev.key, ahead=self.decode_steps)
                return self._retire(events + self._collect(prev))
            events += self._collect(prev)
        admitted = self._admit()
        if self.prefill_chunk is not None:
            self.prefilling += admitted
            events += self._prefill_chunked()
        elif admitted:
            events += self._prefill(admitted)
        running = [s for s in self.slots if s is not None and s.last is not None]
        key = self._fast_key(running)
        if running and self.drafter is not None:
            events += speculative_round(self, running)
        elif running and key is not None:  # its tokens are read at the next step
            self.bufs.load(running)
            self._inflight = self._launch(running, key, ahead=0)
        elif running:
            events += self._decode(running)
        return self._retire(events)

    def _retire(self, events: list[Event]) -> list[Event]:
        """Forget requests whose last sequence finished in these events (every finish has one)."""
        for ev in events:
            req = self.requests.get(ev.request_id) if ev.finish_reason is not None else None
            if req is not None and req.finished:
                self.requests.pop(req.request_id)
        return events

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting:
            free = [i for i, s in enumerate(self.slots) if s is None]
            req = self.waiting[0]
            if len(free) < req.params.n:
                break
            self.waiting.popleft()
            for seq, slot in zip(req.sequences, free):
                seq.slot = slot
                self.slots[slot] = seq
            first = req.sequences[0]
            if self.prefix is not None:  # the cached KV of the prompt's longest known prefix
                first.prefix = self.prefix.match(req.prompt_ids)
                first.length = self.prefix.load(first.prefix, first.slot)
            admitted.append(req.sequences[0])  # siblings get a copy of its prefill
        return admitted

    def _prefill(self, firsts: list[Sequence]) -> list[Event]:
        """Prefill the prompts admitted this step (after any cached prefix) and sample their
        first tokens."""
        chunks = [(s, len(s.request.prompt_ids) - s.length) for s in firsts]
        return self._prefilled(chunks, self._prefill_rows(chunks))

    def _prefill_chunked(self) -> list[Event]:
        """Feed at most `prefill_chunk` prompt tokens this step (oldest prompts first, all chunks
        in one forward), so a long prompt delays the running sequences' next token by a bounded
        amount. The bound counts padded tokens: the forward is rows x the widest chunk."""
        chunks, width, budget = [], 0, self.prefill_chunk
        for s in self.prefilling:
            rows, left = len(chunks) + 1, len(s.request.prompt_ids) - s.length
            w = max(width, min(left, budget // rows))  # widest a chunk may be with this many rows
            if rows * w > budget:
                w = width  # no wider than the chunks taken so far
            if w == 0 or rows * w > budget:
                break
            chunks.append((s, min(left, w)))
            width = max(width, min(left, w))
        if not chunks:
            return []
        return self._prefilled(chunks, self._prefill_rows(chunks))

    def _prefilled(self, chunks: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[Event]:
        """Sequences fed n more prompt tokens (logits [len(chunks), V] at each one's last): those
        whose prompt is now complete are stored in the prefix cache, copied to their siblings'
        rows (n > 1) and sample their first tokens, all rows in one `sample`."""
        seqs, rows = [], []
        for (s, n), lg in zip(chunks, logits):
            s.length += n
            prompt = s.request.prompt_ids
            if s.length < len(prompt):  # chunked prefill: more to come
                continue
            self.prefilling = [t for t in self.prefilling if t is not s]
            if self.prefix is not None:
                self.prefix.store(prompt, s.slot)
            sibs = s.request.sequences
            self.cache.copy_rows(s.slot, [t.slot for t in sibs[1:]], s.length)
            for t in sibs:
                t.length = s.length
                seqs.append(t)
                rows.append(lg)
        return self._accept(seqs, torch.stack(rows)) if seqs else []

    # at most this many (padded) tokens per prefill forward: its logits are [rows, T, vocab]
    PREFILL_TOKENS = 32768

    def _prefill_rows(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Feed each sequence s its next n prompt tokens (positions s.length..) -> the logits at
        each one's last fed token [len(chunks), V]; s.length is left to the caller.

        All rows go into one forward whatever their slots (the cache view takes row ids; rows
        right-padded to the longest), as long as the padded batch stays within PREFILL_TOKENS.
        Padding tokens sit after a row's last real position, where its queries never look, and
        at position max_len - 1 at the latest: no prompt token holds that slot (prompts are
        shorter than max_len), and a row writes it before it reads it. Sliding-window rings keep
        a row's last tokens, padding included, so with rings each row is fed alone."""
        if self.cache.has_rings:
            return torch.cat([self._prefill_one(s, n) for s, n in chunks])
        order = sorted(range(len(chunks)), key=lambda i: -chunks[i][1])  # longest first: less padding
        out = [None] * len(chunks)
        while order:
            T = chunks[order[0]][1]
            k = max(1, min(len(order), self.PREFILL_TOKENS // T))
            part, order = order[:k], order[k:]
            for i, lg in zip(part, self._prefill_batch([chunks[i] for i in part], T)):
                out[i] = lg
        return torch.stack(out)

    def _prefill_batch(self, chunks: list[tuple[Sequence, int]], T: int) -> torch.Tensor:
        """One forward for chunks of at most T tokens. Compiled, its shapes avoid what would
        make dynamo compile again (one graph then serves every admission): at least 2 rows (a
        dummy row of padding) of 2 tokens, since sizes of 1 are specialised, and at least one
        slot more than tokens, since attention branches on T == S (the extra slot lies beyond
        every real query's position, so it is masked)."""
        fixed = self._prefill_fn is not None
        k, T, end = max(2 if fixed else 1, len(chunks)), max(2 if fixed else 1, T), self.max_len - 1
        ids = torch.zeros(k, T, dtype=torch.long)
        pos = torch.full((k, T), end, dtype=torch.long)  # a dummy row: only padding, at `end`
        rows = [chunks[0][0].slot] * k
        for b, (s, n) in enumerate(chunks):
            ids[b, :n] = torch.tensor(s.request.prompt_ids[s.length:s.length + n])
            pos[b] = torch.arange(s.length, s.length + T).clamp_(max=end)
            rows[b] = s.slot
        length = max(s.length + n for s, n in chunks)
        if fixed:
            length = min(self.max_len, max(T + 1, length))
        dev = self.device
        self.prefill_forwards += 1
        logits = self._forward_prefill(ids.to(dev), pos.to(dev), torch.tensor(rows, device=dev), length)
        last = torch.tensor([n - 1 for _, n in chunks], device=dev)
        return logits[torch.arange(len(chunks), device=dev), last]

    def _prefill_one(self, s: Sequence, n: int) -> torch.Tensor:
        """Feed one sequence its next n prompt tokens from its own row (no padding) -> [1, V]."""
        ids = torch.tensor([s.request.prompt_ids[s.length:s.length + n]], device=self.device)
        pos = torch.arange(s.length, s.length + n, device=self.device)[None]
        self.prefill_forwards += 1
        return self._forward_prefill(ids, pos, slice(s.slot, s.slot + 1), s.length + n)[:, -1]

    # -- the steady-state decode step (pipeline.py) ------------------------------------------------
    def _fast_key(self, running: list[Sequence]) -> tuple | None:
        """The sampling key all running rows share, if the captured step may decode them."""
        keys = {fast_key(s.request.params) for s in running}
        if len(keys) != 1 or None in keys or self.prefilling:  # idle-row junk must not hit a prefill
            return None
        return keys.pop()

    def _may_pipeline(self, prev: InFlight) -> bool:
        """Whether launch t+1 may start before launch t's tokens are read: the same rows go on
        (no abort, no chunked prefill, no request that could take a free slot), and at least one
        row may outlive launch t (otherwise launch t+1 would be thrown away whole)."""
        if self.prefilling or any(s.finish_reason is not None for s in prev.seqs):
            return False
        if self.waiting and sum(s is None for s in self.slots) >= self.waiting[0].params.n:
            return False
        k = self.decode_steps
        return not all(len(s.row.output_ids) + k >= s.request.params.max_tokens or s.length + k + 1 >= self.max_len
                       for s in prev.seqs)

    def _launch(self, seqs: list[Sequence], key: tuple, ahead: int) -> InFlight:
        """Decode `decode_steps` tokens for every row from the device buffers (no host sync).
        `ahead` = the tokens per row of a launch the host has not read yet (rows' lengths lag)."""
        need = min(self.max_len, max(s.length for s in seqs) + ahead + self.decode_steps)  # slots attended
        if self.fused is not None and not self.fused.holds():  # before a replay: graphs run no Python
            log.warning("fused decode step off: the model's packed projections were dropped")
            self.fused = None
            self.graphs.graphs.clear()  # captured with the fused kernels, reading the old buffers
        if self.compiled:  # all rows; a few fixed lengths, one CUDA graph each
            length = min(self.max_len, max(256, 1 << (need - 1).bit_length()))
            self.graphs.launch(self._step_fn, key, length)
        else:
            self.bufs.run(self._sample_step, max(s.slot for s in seqs) + 1, key, need)
        return self.bufs.send(seqs, key)

    def _sample_step(self, tokens, pos, key: tuple, length: int) -> torch.Tensor:
        if self.fused is not None and not self.fused.holds():
            log.warning("fused decode step off: the model's packed projections were dropped")
            self.fused = None
        if self.fused is not None:
            if key[0] == "greedy":  # the argmax in the head kernel: no logits written, no fp32 copy
                return self.fused(tokens, pos, length, greedy=True)
            logits = self.fused(tokens, pos, length)
        else:
            logits = self._forward(tokens, pos, slice(0, tokens.shape[0]), length)[:, -1]
        return sample_fast(logits, key)

    def _fused_decoder(self, wanted: bool | None):
        """The fused steady-state step (fused_decode.py) when wanted (None: when compiled, i.e. on
        CUDA, where it was measured; an eager engine would autotune again for every row count) and
        supported; None otherwise, with the reason logged when it was asked for or would have run."""
        if wanted is False or (wanted is None and not self.compiled):
            return None
        from lmforge.inference.fused_decode import FusedDecoder, supports

        reason = supports(self.model, self.cache, self.max_batch)
        if reason is not None:
            log.log(logging.WARNING if wanted else logging.INFO, "fused decode step not used: %s", reason)
            return None
        return FusedDecoder(self.model, self.cache)

    def _collect(self, prev: InFlight) -> list[Event]:
        """Launch t's tokens -> events, each row's in order. A row drops its tokens after it
        finishes (a stop in this launch or the previous one, an abort): they are the extra
        tokens of multi-step decoding and of the pipeline."""
        tokens = prev.read()  # [decode_steps][rows]
        events = []
        for s in prev.seqs:
            for step in tokens:
                if s.finish_reason is not None:
                    break
                s.length += 1
                events.append(self._emit(s, step[s.slot], None, None))
        return events

    def _decode(self, running: list[Sequence]) -> list[Event]:
        nb = max(s.slot for s in running) + 1
        tokens = torch.zeros(nb, 1, dtype=torch.long)
        pos = torch.zeros(nb, 1, dtype=torch.long)
        for s in running:
            tokens[s.slot, 0], pos[s.slot, 0] = s.last, s.length
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        if self._graph_ok():
            logits = self._forward_graph(tokens, pos)[:, -1]
        else:
            logits = self._forward_rows(tokens, pos, max(s.length for s in running) + 1)[:, -1]
        for s in running:
            s.length += 1
        idx = torch.tensor([s.slot for s in running], device=self.device)
        return self._accept(running, logits[idx])

    def _graph_ok(self) -> bool:
        """The fixed-shape (CUDA-graph) forward writes junk into every idle row, so no row may be
        in the middle of a chunked prefill, wherever it is."""
        return self.compiled and not self._busy(self.max_batch)

    def _forward_graph(self, tokens, pos) -> torch.Tensor:
        """Rows 0..nb of tokens, pos [nb, T] through the compiled forward over all rows and the
        whole cache (idle rows: token 0 at positions 0..T-1, in free rows)."""
        nb, T = tokens.shape
        full_tokens = torch.zeros(self.max_batch, T, dtype=torch.long, device=self.device)
        full_pos = torch.arange(T, device=self.device).repeat(self.max_batch, 1)
        full_tokens[:nb], full_pos[:nb] = tokens, pos
        self._new_graph_step()
        return self._decode_fn(full_tokens, full_pos)[:nb]

    def _new_graph_step(self) -> None:
        """Tell the CUDA-graph runtime a new step begins: the last replay's outputs are dead (the
        steady-state and the general step's graphs alternate). Only on CUDA: on CPU (tests that run
        this path eagerly) it would import the whole compiler stack."""
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def _busy(self, nb: int) -> list[int]:
        """Rows below nb that hold a sequence still being prefilled (chunked)."""
        return [s.slot for s in self.slots if s is not None and s.last is None and s.slot < nb]

    def _forward_rows(self, tokens, pos, length: int) -> torch.Tensor:
        """Logits for rows 0..nb (tokens, pos [nb, T]); rows still being prefilled (chunked) must
        not get the junk writes that idle rows get, so the forward runs around them."""
        nb = tokens.shape[0]
        busy = self._busy(nb)
        if not busy:
            return self._forward(tokens, pos, slice(0, nb), length)
        logits = torch.zeros(nb, tokens.shape[1], self.model.cfg.vocab_size, device=self.device)
        bounds = [-1] + sorted(busy) + [nb]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi - lo > 1:
                rows = slice(lo + 1, hi)
                logits[rows] = self._forward(tokens[rows], pos[rows], rows, length).float()
        return logits

    def _forward(self, ids, pos, rows: slice, length: int) -> torch.Tensor:
        view = self.cache.view(rows, length, pos)
        return self.model(ids, positions=pos, kv_cache=view).logits

    def _forward_full(self, ids, pos) -> torch.Tensor:
        return self._forward(ids, pos, slice(0, self.max_batch), self.max_len)

    def _forward_from(self, ids, pos, rows, length: int) -> torch.Tensor:
        """rows: a tensor of row ids, or the first of ids.shape[0] adjacent rows (an int)."""
        if not isinstance(rows, torch.Tensor):
            rows = slice(rows, rows + ids.shape[0])
        return self._forward(ids, pos, rows, length)

    def _forward_prefill(self, ids, pos, rows: torch.Tensor | slice, length: int) -> torch.Tensor:
        """A prefill forward; compiled (dynamic shapes, one graph) when the engine is. It is
        compiled with fullgraph, so that dynamo's recompile limit raises instead of running
        eager unnoticed; should the model have a graph break (e.g. a log call), it is compiled
        again without fullgraph. Should compilation fail, prefill runs eager from then on. Both
        are logged once."""
        if self._prefill_fn is not None:
            import torch.fx.experimental._config  # noqa: F401 (loaded by the compiler anyway)

            try:
                if not self._prefill_warm:
                    self._prefill_warm = True
                    self._warm_prefill(rows)
                # no duck sizing: sizes that happen to be equal at the first call (2 rows, 2 kv
                # heads) would otherwise be guarded equal and compile again at the next call
                with torch.fx.experimental._config.patch(use_duck_shape=False):
                    return self._prefill_fn(ids, pos, rows.start if isinstance(rows, slice) else rows, length)
            except Exception as e:  # a compiler limitation must not take the engine down
                # Under fullgraph, a part dynamo cannot trace as one graph raises: a graph break
                # (Unsupported) or a data-dependent branch (learned positions' int(positions.max()),
                # MoE's per-expert counts: UserError / GuardOnDataDependentSymNode). Those compile
                # again with graph breaks allowed; anything else (the recompile limit, a compiler
                # error) runs prefill eager from then on.
                if self._prefill_fullgraph and _not_one_graph(e):
                    log.warning("compiled prefill is not one graph, compiling it with graph breaks: %s: %s",
                                type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                    self._prefill_fullgraph, self._prefill_warm = False, False
                    self._prefill_fn = torch.compile(self._forward_from, dynamic=True, **self._prefill_backend)
                    return self._forward_prefill(ids, pos, rows, length)
                self._eager_prefill(e)
        return self._forward(ids, pos, rows, length)

    def _eager_prefill(self, e: Exception) -> None:
        log.warning("compiled prefill failed, prefill runs eager from now on: %s: %s",
                    type(e).__name__, str(e)[:500])
        self._prefill_fn = None

    def _warm_prefill(self, rows: torch.Tensor | slice) -> None:
        """Compile the prefill at sizes that are all different and > 1 (3 rows, 5 tokens, 7 slots
        attended) before its first real call: dynamo compiles a graph for the sizes it sees
        first, and would treat sizes of 1, or a length that happens to equal the token count,
        as constants there and compile again for the next shape. The call writes only slot
        max_len - 1, which no prompt token holds and every row writes before it reads it."""
        if isinstance(rows, slice) or self.max_len < 8:  # ring caches: one row at a time; tiny caches:
            return  # the warm-up's 5 tokens + 1 slot would not fit, the first admission compiles
        ids = torch.zeros(3, 5, dtype=torch.long, device=self.device)
        pos = torch.full((3, 5), self.max_len - 1, device=self.device)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            self._prefill_fn(ids, pos, rows[:1].repeat(3), min(7, self.max_len))

    # -- sampled tokens -> events -----------------------------------------------------------------
    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        out = sample(logits, [s.row for s in seqs])
        tokens = out.tokens.tolist()  # the one host sync of the step
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        tops = (out.top_ids.tolist(), out.top_logprobs.tolist()) if out.top_ids is not None else None
        return [self._emit(s, tok, lps[b] if lps else None, dict(zip(tops[0][b], tops[1][b])) if tops else None)
                for b, (s, tok) in enumerate(zip(seqs, tokens))]

    def _emit(self, s: Sequence, tok: int, logprob: float | None, top: dict[int, float] | None) -> Event:
        """Sequence s produced token tok (its cache holds s.length tokens before it)."""
        p = s.request.params
        if tok in self.eos_ids or tok in p.stop_ids:
            return self._finish(s, "stop")
        s.row.output_ids.append(tok)
        s.last = tok
        ev = Event(s.request.request_id, s.index, tok)
        if logprob is not None and p.logprobs is not None:
            ev.logprob = logprob
            ev.top_logprobs = dict(list((top or {}).items())[:p.logprobs])
            s.logprobs.append(ev.logprob)
            s.top_logprobs.append(ev.top_logprobs)
        stopped = False
        if s.text is not None:
            ev.text, stopped = s.text.push(tok)
        if stopped:
            self._finish(s, "stop", ev)
        elif len(s.row.output_ids) >= p.max_tokens or s.length + 1 >= self.max_len:
            self._finish(s, "length", ev)
        return ev

    def _finish(self, s: Sequence, reason: str, ev: Event | None = None) -> Event:
        s.finish_reason = reason
        s.last = None
        if self.prefix is not None:  # its prompt and reply can serve as a later request's prefix
            if s.slot is not None:
                self.prefix.store((s.row.prompt_ids + s.row.output_ids)[:s.length], s.slot)
            self.prefix.release(s.prefix)
            s.prefix = []
        if s.slot is not None:
            self.slots[s.slot] = None
            s.slot = None
        if ev is None:
            ev = Event(s.request.request_id, s.index, None)
        ev.finish_reason = reason
        if s.text is not None and reason != "abort":
            ev.text += s.text.finish()
        return ev

    # -- convenience ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[Completion]]:
        """Run prompts to completion (continuous batching when there are more than max_batch):
        for each prompt, its n completions."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        reqs = [self.requests[i] for i in ids]
        while any(i in self.requests for i in ids):  # finished requests leave self.requests
            self.step()
        return [[completion(s) for s in r.sequences] for r in reqs]
