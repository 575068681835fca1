"""The model stage: configurable decoder-only Transformers (GPT-2, Llama, Gemma-2, DeepSeek-V3 styles).

    from lmforge.model import ModelConfig, Transformer, ModelOutput, get_preset

See config.py (every switch), transformer.py (the model), attention.py (the `attend` backends),
accounting.py (parameters, FLOPs, memory). HF checkpoints: lmforge.interop.
"""

from lmforge.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ModelConfig": "config",
    "Transformer": "transformer",
    "ModelOutput": "transformer",
    "Block": "transformer",
    "pack_projections": "transformer",
    "KVCache": "cache",
    "get_preset": "presets",
    "PRESETS": "presets",
    "count_params": "accounting",
    "flops_per_token": "accounting",
    "memory_estimate": "accounting",
})
__all__ = ["ModelConfig", "Transformer", "ModelOutput", "Block", "pack_projections", "KVCache", "get_preset", "PRESETS", "count_params", "flops_per_token", "memory_estimate"]
