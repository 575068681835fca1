"""Lazy package exports: a stage package's public names are imported on first use.

The CLI imports every stage's `commands` module to build its parser, and importing a submodule
runs its package's `__init__`. Stage packages whose public names pull in torch (seconds to import)
declare them here instead, so `lmforge tokenizer train` or `lmforge --help` never pays for torch:

    __getattr__, __dir__ = lazy_exports(__name__, {"Transformer": "transformer", ...})

`from lmforge.model import Transformer` works as before; the first access imports the submodule.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """Return a module `__getattr__` and `__dir__` serving `name -> package.<submodule>.name`."""

    def __getattr__(name: str):
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
