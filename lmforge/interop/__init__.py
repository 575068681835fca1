"""Interop with other model ecosystems: Hugging Face checkpoints (hf.py).

    from lmforge.interop import export_hf, import_hf
"""

from lmforge.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "export_hf": "hf",
    "import_hf": "hf",
    "to_hf_config": "hf",
    "from_hf_config": "hf",
})
__all__ = ["export_hf", "import_hf", "to_hf_config", "from_hf_config"]
