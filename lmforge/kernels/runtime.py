"""When a Triton kernel runs and when the torch path does instead, and how block sizes are chosen.

Every op in `lmforge.kernels` has two paths: a readable torch reference and a Triton kernel. This
module decides between them (`choose_impl`), logs the reason once whenever it falls back, and wraps
kernels for block-size autotuning (`Tunable`): on a GPU, `triton.autotune` times the candidate
configs once per shape key and caches the winner; under `TRITON_INTERPRET=1` (CPU tests) a fixed
config runs, because the autotuner needs a GPU.

It does not import triton at module import time beyond a guarded check, so lmforge works without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from lmforge.errors import LMForgeError

log = logging.getLogger("lmforge.kernels")


class KernelInputError(LMForgeError):
    """A kernel was called with tensors or options it cannot handle (shape, dtype, device, option)."""


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> str | None:
    """Why triton cannot be used, or None when it imports."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # any failure to import means: use the torch path
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_unavailable_reason(*tensors: torch.Tensor, uses_bf16_dot: bool = False) -> str | None:
    """None when the Triton kernel can run on these tensors, else a one-line reason.

    `uses_bf16_dot`: the kernel multiplies bf16 tiles with `tl.dot`, which the interpreter computes
    wrongly (silently), so bf16 inputs under the interpreter take the torch path.
    """
    err = triton_import_error()
    if err:
        return err
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors are on several devices {sorted(map(str, devices))}"
    device = devices.pop()
    if device.type == "cuda":
        return None
    if not interpreting():
        return f"tensors are on {device.type} and TRITON_INTERPRET is not set (no GPU kernel to run)"
    if uses_bf16_dot and any(t.dtype == torch.bfloat16 for t in tensors):
        return "bf16 tl.dot is computed wrongly by the Triton interpreter"
    return None


_logged: set[tuple[str, str]] = set()


def choose_impl(op: str, impl: str, *tensors: torch.Tensor, uses_bf16_dot: bool = False) -> str:
    """Return "triton" or "torch" for `impl` in {"auto", "triton", "torch"}.

    "auto" falls back to the torch path with a logged reason (once per op and reason); an explicit
    "triton" that cannot run raises KernelInputError rather than silently running something else.
    """
    if impl not in ("auto", "triton", "torch"):
        raise KernelInputError(f"{op}: impl={impl!r}; expected 'auto', 'triton' or 'torch'")
    if impl == "torch":
        return "torch"
    reason = triton_unavailable_reason(*tensors, uses_bf16_dot=uses_bf16_dot)
    if impl == "auto" and reason is None and any(t.device.type != "cuda" for t in tensors):
        # The interpreter is a test tool, far slower than the torch path: "auto" never picks it, so
        # a test suite that sets TRITON_INTERPRET for kernel tests does not change other tests.
        reason = "tensors are not on a GPU (the Triton interpreter runs only with impl='triton')"
    if reason is None:
        return "triton"
    if impl == "triton":
        raise KernelInputError(f"{op}: the Triton kernel cannot run: {reason}")
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        log.info("%s: using the torch path because %s", op, reason)
    return "torch"


class Tunable:
    """A Triton kernel plus candidate configs: autotuned on GPU, a fixed config under the interpreter.

    `configs` are dicts of meta-parameters (block sizes) plus optional "num_warps"/"num_stages";
    `key` names the kernel arguments whose values select a cached choice; `fixed` is the config
    used under the interpreter (small blocks keep CPU tests fast); `reset_to_zero` names output
    arguments that the kernel accumulates into (zeroed before each timed candidate).
    LMFORGE_KERNEL_TUNE=0 skips tuning on GPU and runs the first config; `forced` (set by the
    `force` context manager) runs one given config, for benchmarks that time candidates themselves.
    Index like a kernel: `tunable[grid](*args)`, where grid may be a function of the meta-parameters.
    """

    def __init__(self, kernel, configs: list[dict], key: list[str], fixed: dict,
                 reset_to_zero: list[str] | None = None):
        self.kernel, self.configs, self.key, self.fixed = kernel, configs, key, fixed
        self.reset_to_zero = reset_to_zero
        self.forced: dict | None = None
        self._autotuned = None

    def _tuned(self):
        if self._autotuned is None:
            import triton

            cfgs = []
            for c in self.configs:
                meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
                cfgs.append(triton.Config(meta, num_warps=c.get("num_warps", 4),
                                          num_stages=c.get("num_stages", 2)))
            self._autotuned = triton.autotune(configs=cfgs, key=self.key,
                                              reset_to_zero=self.reset_to_zero)(self.kernel)
        return self._autotuned

    def __getitem__(self, grid):
        if interpreting():
            fixed = {k: v for k, v in self.fixed.items() if k not in ("num_warps", "num_stages")}
            return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **fixed)
        if self.forced is not None:
            return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.forced)
        if os.environ.get("LMFORGE_KERNEL_TUNE", "1") == "0":  # skip tuning: the first config that fits
            return lambda *args, **kwargs: self._first_fitting(grid, args, kwargs)
        return self._tuned()[grid]

    def _first_fitting(self, grid, args, kwargs):
        from triton.runtime.errors import OutOfResources

        for i, config in enumerate(self.configs):
            try:
                return self.kernel[grid](*args, **kwargs, **config)
            except OutOfResources:  # e.g. fp32 tiles of a large head dim: too much shared memory
                if i == len(self.configs) - 1:
                    raise

    @contextlib.contextmanager
    def force(self, config: dict | None):
        """Within the block, every launch uses `config` (None: the normal choice)."""
        previous, self.forced = self.forced, config
        try:
            yield
        finally:
            self.forced = previous

    def best_configs(self) -> dict:
        """The cached choice per shape key (for benchmark reports); empty before any GPU launch."""
        if self._autotuned is None:
            return {}
        return {str(k): str(v) for k, v in self._autotuned.cache.items()}
