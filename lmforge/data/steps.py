"""Imports every module that registers pipeline steps, so `build_step` can find them by name.

Importing a step module does not import its optional dependencies; a step checks for them when it
is constructed and raises MissingDependencyError naming the step's package.
"""

from lmforge.data import (  # noqa: F401
    dedup,
    extract,
    heuristics,
    langid,
    minhash,
    pii,
    quality,
    writers,
)
