"""Kernel tests run the Triton kernels on the CPU through the interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined; lmforge's kernel modules
are imported lazily, so setting it here (at collection) is early enough.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
