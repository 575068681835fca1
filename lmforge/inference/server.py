"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine, plus a chat page.

    app = create_app(engine, tokenizer, model_name="tiny")   # then uvicorn.run(app)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as
server-sent events ending in `data: [DONE]`, `stream_options.include_usage`), `GET /` (the web chat
page, static HTML + JS, no build step), `GET /health`.

`EngineWorker` runs the engine on one background thread (the engine is not thread-safe): handlers
submit requests through a lock-protected inbox and receive events on an asyncio queue (a list of a
request's events per engine step: one cross-thread wake-up and one write to the socket per step,
not per token, as a step decodes up to `decode_steps` tokens per row). A client
that disconnects has its request aborted, freeing its slot. The waiting queue is bounded: when it
is full a request gets 429 instead of piling up.

`batching="continuous"` (the default) hands every request to the engine at once: it joins the
running batch at the next step and finished sequences leave at once. `batching="static"` is the
same engine without continuous batching, kept as the baseline of the serving benchmark: requests
wait in the worker until the engine is idle (no sequence running), then as many as fit
`max_batch` start together and the next ones wait for the whole batch to finish. Bad requests get 400 with an OpenAI-style body
{"error": {"message", "type", "param", "code"}}.

This module knows HTTP and JSON; sampling and scheduling live in the engine.
"""


import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from lmforge.errors import ConfigError, LMForgeError, require
from lmforge.inference.chat import apply_chat_template
from lmforge.inference.engine import Engine, Event
from lmforge.inference.sampling import SamplingParams


class QueueFull(LMForgeError):
    pass


BATCHING = ("continuous", "static")


class EngineWorker:
    """The engine on a background thread; handlers talk to it through `submit` and `abort`."""

    def __init__(self, engine: Engine, max_queue: int = 64, batching: str = "continuous"):
        if batching not in BATCHING:
            raise ConfigError(f"batching = {batching!r} must be one of {', '.join(BATCHING)}")
        self.engine, self.max_queue, self.batching = engine, max_queue, batching
        self._lock = threading.Lock()
        self._inbox: list = []
        self._held: list = []  # static batching: ("add", ...) ops waiting for the engine to be idle
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        with self._lock:
            waiting = len(self.engine.waiting) + len(self._held) + sum(1 for op in self._inbox if op[0] == "add")
            if waiting >= self.max_queue:
                raise QueueFull(f"the server is busy: {waiting} requests are already waiting")
            rid = f"cmpl-{uuid.uuid4().hex[:24]}"
            q: asyncio.Queue = asyncio.Queue()
            self._queues[rid] = (asyncio.get_running_loop(), q)
            self._inbox.append(("add", rid, prompt_ids, params))
        self._wake.set()
        return rid, q

    def abort(self, rid: str) -> None:
        with self._lock:
            self._inbox.append(("abort", rid))
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _deliver(self, rid: str, item) -> None:
        target = self._queues.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the client's loop is gone
                pass

    @property
    def n_held(self) -> int:
        """Requests waiting in the worker for the running batch to end (static batching)."""
        return len(self._held)

    def _add(self, op) -> None:
        try:
            self.engine.add_request(op[2], op[3], request_id=op[1])
        except LMForgeError as e:
            self._deliver(op[1], e)
            self._queues.pop(op[1], None)

    def _start_batch(self) -> None:
        """Static batching: the engine is idle, so the held requests that fit its rows start."""
        free, start = self.engine.max_batch, []
        with self._lock:
            while self._held and self._held[0][3].n <= free:
                start.append(self._held.pop(0))
                free -= start[-1][3].n
        for op in start:  # outside the lock: submit() on the event loop need not wait for the engine
            self._add(op)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for op in inbox:
                if op[0] == "add" and self.batching == "static":
                    with self._lock:
                        self._held.append(op)
                elif op[0] == "add":
                    self._add(op)
                elif any(h[1] == op[1] for h in self._held):  # aborted before it started
                    with self._lock:
                        self._held = [h for h in self._held if h[1] != op[1]]
                    self._queues.pop(op[1], None)
                else:
                    eng.abort(op[1])
            if self._held and not eng.has_work():  # static: the last batch has finished
                self._start_batch()
            if not eng.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = eng.step()
            except Exception as e:  # a failing step must not leave clients hanging
                for rid in list(eng.requests):
                    self._deliver(rid, e)
                    eng.abort(rid)
                eng.step()
                continue
            per_request: dict[str, list[Event]] = {}
            for ev in events:
                per_request.setdefault(ev.request_id, []).append(ev)
            for rid, evs in per_request.items():
                self._deliver(rid, evs)
            with self._lock:  # submit() adds queues from the event loop's thread
                live = {o[1] for o in self._inbox} | {o[1] for o in self._held}
                for rid in [r for r in self._queues if r not in eng.requests and r not in live]:
                    self._queues.pop(rid, None)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                                "param": param, "code": None}})


def _params(body: dict, default_max: int) -> SamplingParams:
    body = {k: v for k, v in body.items() if v is not None}  # JSON null means "the default"
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ConfigError("'stop' must be a string or a list of up to 4 strings")
    lp = body.get("logprobs")
    if body.get("_chat"):
        lp = (body.get("top_logprobs") or 0) if lp else None
    elif lp is not None and not isinstance(lp, int):
        raise ConfigError("'logprobs' must be an integer (0..20) for completions")
    kw = dict(max_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or default_max,
              temperature=body.get("temperature", 1.0), top_p=body.get("top_p"), top_k=body.get("top_k"),
              min_p=body.get("min_p"), repetition_penalty=body.get("repetition_penalty", 1.0),
              presence_penalty=body.get("presence_penalty", 0.0),
              frequency_penalty=body.get("frequency_penalty", 0.0), seed=body.get("seed"),
              n=body.get("n", 1), stop=stop, logprobs=lp)
    for k, v in kw.items():
        if k in ("stop",) or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"'{k}' must be a number, got {v!r}")
    for k in ("max_tokens", "n", "top_k", "seed"):
        if kw[k] is not None and kw[k] != int(kw[k]):
            raise ConfigError(f"'{k}' must be an integer, got {kw[k]!r}")
    if kw["top_p"] is not None and kw["top_p"] >= 1:
        kw["top_p"] = None
    return SamplingParams(**kw)


def create_app(engine: Engine, tokenizer, model_name: str = "lmforge", max_queue: int = 64,
               batching: str = "continuous"):
    require("fastapi", "the server", "serve")
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, StreamingResponse

    worker = EngineWorker(engine, max_queue, batching)
    app = FastAPI(title="lmforge", version="1")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.close)
    created = int(time.time())
    default_max = 256

    @app.get("/health")
    def health():
        d = {"status": "ok", "batching": worker.batching, "running": engine.n_running,
             "waiting": len(engine.waiting) + worker.n_held}
        if engine.drafter is not None:  # speculative decoding: rounds, drafted and accepted tokens so far
            d["speculative"] = dict(engine.spec_stats)
        if engine.prefix is not None:  # prompt tokens looked up / found in the prefix cache
            d["prefix_cache"] = {"query_tokens": engine.prefix.query_tokens, "hit_tokens": engine.prefix.hit_tokens}
        return d

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge"}]}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (Path(__file__).parent / "chat.html").read_text(encoding="utf-8")

    async def _body(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ConfigError("the request body must be a JSON object")
        return body

    def _prompt_ids(body: dict, chat: bool) -> tuple[list[int], SamplingParams]:
        if chat:
            cp = apply_chat_template(body.get("messages"), tokenizer)
            ids, extra_stop, stop_ids = cp.ids, cp.stop, cp.stop_ids
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = ([tokenizer.eot_id] if tokenizer.eot_id is not None else []) + tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = list(prompt)
            else:
                raise ConfigError("'prompt' must be a string (or a list of token ids)")
            extra_stop, stop_ids = [], []
        params = _params(dict(body, _chat=chat), default_max)
        params.stop = params.stop + extra_stop
        params.stop_ids = stop_ids
        if len(ids) >= engine.max_len:
            raise ConfigError(f"the prompt has {len(ids)} tokens; this model's context is {engine.max_len} "
                              "tokens (prompt plus at least one generated token)")
        if params.n > engine.max_batch:
            raise ConfigError(f"'n' = {params.n} exceeds this server's batch size {engine.max_batch}")
        V = engine.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ConfigError(f"prompt token ids must be in [0, {V})")
        params.max_tokens = min(params.max_tokens, engine.max_len - len(ids))
        return ids, params

    def _logprob_entry(ev: Event, chat: bool):
        tok = lambda i: tokenizer.decode_bytes([i]).decode("utf-8", errors="replace")
        if chat:
            return {"token": tok(ev.token_id), "logprob": ev.logprob,
                    "bytes": list(tokenizer.decode_bytes([ev.token_id])),
                    "top_logprobs": [{"token": tok(i), "logprob": v, "bytes": list(tokenizer.decode_bytes([i]))}
                                     for i, v in (ev.top_logprobs or {}).items()]}
        return tok(ev.token_id), ev.logprob, {tok(i): v for i, v in (ev.top_logprobs or {}).items()}

    async def _handle(request: Request, chat: bool):
        try:
            body = await _body(request)
            ids, params = _prompt_ids(body, chat)
            rid, queue = worker.submit(ids, params)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error")
        except LMForgeError as e:
            return _error(400, str(e))
        kind = "chat.completion" if chat else "text_completion"
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        n_prompt = len(ids)

        def chunk(choices, usage=None):
            d = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                 "model": model_name, "choices": choices}
            if usage is not None or (stream and include_usage):
                d["usage"] = usage
            return d

        def usage(n_out):
            return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

        async def next_events(timeout: float | None = None) -> list[Event]:
            """The request's events of the next engine step."""
            item = await (asyncio.wait_for(queue.get(), timeout) if timeout else queue.get())
            if isinstance(item, Exception):
                raise item
            return item

        def lp_choice(evs):
            if params.logprobs is None:
                return None
            evs = [e for e in evs if e.token_id is not None]
            if chat:
                return {"content": [_logprob_entry(e, True) for e in evs]}
            entries = [_logprob_entry(e, False) for e in evs]
            return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [top for _, _, top in entries] if params.logprobs else None}

        if stream:
            async def sse():
                n_out, left = 0, params.n
                try:
                    if chat:
                        for i in range(params.n):
                            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}
                            yield "data: " + json.dumps(chunk([first])) + "\n\n"
                    while left:
                        pieces = []  # one SSE event per token, written together per engine step
                        for ev in await next_events():
                            n_out += ev.token_id is not None
                            left -= ev.finish_reason is not None
                            if not ev.text and ev.finish_reason is None and params.logprobs is None:
                                continue  # a held-back partial character or stop-string prefix
                            c = {"index": ev.index, "finish_reason": ev.finish_reason,
                                 "logprobs": lp_choice([ev]) if ev.token_id is not None else None}
                            if chat:
                                c["delta"] = {"content": ev.text} if ev.text else {}
                            else:
                                c["text"] = ev.text
                            pieces.append("data: " + json.dumps(chunk([c])) + "\n\n")
                        if pieces:
                            yield "".join(pieces)
                    if include_usage:
                        yield "data: " + json.dumps(chunk([], usage(n_out))) + "\n\n"
                    yield "data: [DONE]\n\n"
                except LMForgeError as e:
                    err = {"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                     "code": None}}
                    yield "data: " + json.dumps(err) + "\n\n"
                finally:
                    if left:  # the client went away (or generation failed): free the slots
                        worker.abort(rid)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        per: list[list[Event]] = [[] for _ in range(params.n)]
        texts, reasons = [""] * params.n, [None] * params.n
        left = params.n
        try:
            while left:
                try:
                    evs = await next_events(timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return _error(499, "client disconnected")
                    continue
                except LMForgeError as e:
                    return _error(500, f"generation failed: {e}", "server_error")
                for ev in evs:
                    per[ev.index].append(ev)
                    texts[ev.index] += ev.text
                    if ev.finish_reason is not None:
                        reasons[ev.index] = ev.finish_reason
                        left -= 1
        finally:
            if left:
                worker.abort(rid)
        n_out = sum(1 for evs in per for e in evs if e.token_id is not None)
        choices = []
        for i in range(params.n):
            c = {"index": i, "finish_reason": reasons[i], "logprobs": lp_choice(per[i])}
            if chat:
                c["message"] = {"role": "assistant", "content": texts[i]}
            else:
                c["text"] = texts[i]
            choices.append(c)
        d = chunk(choices, usage(n_out))
        d["object"] = kind
        return d

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, chat=True)

    return app
