"""The inference stage: KV cache, sampling, batched + continuous-batching engine, speculative
decoding, weight-only quantization, and an OpenAI-compatible server with a web chat page.

    from lmforge.inference import Engine, SamplingParams

See engine.py (scheduler), cache.py (preallocated cache), sampling.py, speculative.py,
quantize.py, server.py. Imports only model, kernels and tokenizer (DESIGN.md).
"""

from lmforge.inference.cache import StaticKVCache
from lmforge.inference.engine import Completion, Engine, Event
from lmforge.inference.sampling import SamplingParams

__all__ = ["Engine", "Event", "Completion", "SamplingParams", "StaticKVCache"]
