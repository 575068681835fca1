"""The model stage: configurable decoder-only Transformers (GPT-2, Llama, Gemma-2, DeepSeek-V3 styles).

    from lmforge.model import ModelConfig, Transformer, ModelOutput, get_preset

See config.py (every switch), transformer.py (the model), attention.py (the `attend` backends),
accounting.py (parameters, FLOPs, memory). HF checkpoints: lmforge.interop.
"""

from lmforge.model.accounting import count_params, flops_per_token, memory_estimate
from lmforge.model.cache import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.presets import PRESETS, get_preset
from lmforge.model.transformer import Block, ModelOutput, Transformer

__all__ = ["ModelConfig", "Transformer", "ModelOutput", "Block", "KVCache", "get_preset", "PRESETS",
           "count_params", "flops_per_token", "memory_estimate"]
