"""Test-session setup shared by every test directory.

TRITON_INTERPRET must be set before triton itself is first imported: Triton's own `@jit` library
functions (e.g. `tl.zeros` in Triton 3.9) are defined then, and a kernel run by the interpreter
cannot call a compiled-mode one ("Cannot call @triton.jit'd outside of the scope of a kernel").
torch._dynamo imports triton, and any test module may import torch._dynamo at collection, before
the kernel tests' own conftest runs. So on a machine without a GPU it is set here, before any test
module is collected; "auto" paths never pick the interpreter (see lmforge/kernels/runtime.py), so
other tests are unaffected. On a GPU machine it is left as given.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
