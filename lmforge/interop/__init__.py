"""Interop with other model ecosystems: Hugging Face checkpoints (hf.py).

    from lmforge.interop import export_hf, import_hf
"""

from lmforge.interop.hf import export_hf, from_hf_config, import_hf, to_hf_config

__all__ = ["export_hf", "import_hf", "to_hf_config", "from_hf_config"]
