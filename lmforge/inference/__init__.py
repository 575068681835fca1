"""The inference stage: KV cache, sampling, batched + continuous-batching engine, speculative
decoding, weight-only quantization, and an OpenAI-compatible server with a web chat page.

    from lmforge.inference import Engine, SamplingParams

See engine.py (scheduler), cache.py (preallocated cache), prefix.py (prefix caching), sampling.py,
speculative.py, quantize.py, server.py. Imports only model, kernels and tokenizer (DESIGN.md).
"""

from lmforge.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Engine": "engine",
    "Event": "engine",
    "Completion": "engine",
    "SamplingParams": "sampling",
    "StaticKVCache": "cache",
    "PrefixCache": "prefix",
    "DraftModel": "speculative",
    "NGramDrafter": "speculative",
})
__all__ = ["Engine", "Event", "Completion", "SamplingParams", "StaticKVCache", "PrefixCache", "DraftModel",
           "NGramDrafter"]
