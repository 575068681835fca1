"""lmforge: build language models from scratch, end to end.

Stages (one package each): tokenizer, data, model, kernels, train, distributed, inference, eval,
scaling, align, interop. Stages talk through artifacts on disk; see DESIGN.md in the docs.
Importing `lmforge` imports nothing heavy: each stage is imported on use.
"""

__version__ = "0.1.0"
