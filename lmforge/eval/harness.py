"""lm-evaluation-harness bridge: run any `lm_eval` task on an lmforge model.

    from lmforge.eval.harness import LMForgeLM
    lm = LMForgeLM.from_path("runs/tiny")            # or LMForgeLM(model, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], ...)

or, after `import lmforge.eval.harness`, `lm_eval`'s registry knows the model "lmforge"
(`model_args="path=RUN_DIR"`). Needs `pip install lmforge[eval]` (lm-eval) and the task's data
(the harness downloads it unless it is cached or the task reads local files).

The three request types map onto our own scorers, so numbers equal `lmforge eval`'s:
- loglikelihood(context, continuation) -> tasks.encode_pair + loglik.score_continuations
  (shared-prefix batching: the harness sends all choices of a question, which share the context);
- loglikelihood_rolling(text) -> loglik.rolling_logprobs with disjoint windows (stride = context),
  which is the harness's own windowing (`get_rolling_token_windows` with context_len = 1);
- generate_until(context, {until, max_gen_toks, do_sample, temperature}) -> the inference Engine.
"""

from __future__ import annotations

from lmforge.errors import require

require("lm_eval", "the lm-evaluation-harness bridge", "eval")

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from lmforge.eval.intrinsic import encode_document  # noqa: E402
from lmforge.eval.loglik import rolling_logprobs, score_continuations  # noqa: E402
from lmforge.eval.tasks import encode_pair  # noqa: E402


@register_model("lmforge")
class LMForgeLM(LM):
    def __init__(self, model=None, tokenizer=None, *, path: str | None = None, device: str = "cpu",
                 batch_size: int = 32, max_gen_toks: int = 256, max_batch: int = 8, **_):
        super().__init__()
        if model is None:
            from lmforge.inference.commands import load_for_inference

            if path is None:
                raise TypeError("LMForgeLM needs a model and tokenizer, or path=RUN_DIR")
            model, tokenizer, _ = load_for_inference(path, device=device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks, self.max_batch = int(batch_size), int(max_gen_toks), int(max_batch)
        self._engine = None

    @classmethod
    def from_path(cls, path: str, **kw) -> LMForgeLM:
        return cls(path=path, **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LMForgeLM:
        kw = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        kw.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "device"})
        return cls(**kw)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args[:2]) for req in requests]
        return [(s.logprob, s.is_greedy) for s in score_continuations(self.model, pairs, batch_size=self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [encode_document(self.tokenizer, req.args[0]) for req in requests]
        lps = rolling_logprobs(self.model, docs, stride=self.model.cfg.context_length,
                               batch_size=max(1, self.batch_size // 4))
        return [float(lp.sum()) for lp in lps]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmforge.inference.engine import Engine
        from lmforge.inference.sampling import SamplingParams

        if self._engine is None:
            self._engine = Engine(self.model, tokenizer=self.tokenizer, max_batch=self.max_batch)
        encode = getattr(self.tokenizer, "encode_ordinary", self.tokenizer.encode)
        prompts, params = [], []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            ids = ([self.tokenizer.eot_id] + encode(context))
            budget = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = ids[-(self._engine.max_len - min(budget, self._engine.max_len // 2)):]  # keep room to answer
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max(1, min(budget, self._engine.max_len - len(ids))),
                                         temperature=temperature, stop=until))
        return [out[0].text for out in self._engine.generate(prompts, params)]
