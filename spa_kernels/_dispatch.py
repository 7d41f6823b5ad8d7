"""Choosing an implementation ("torch", "cpu", "triton", "cuda") for one call of one op.

Every op has one backend per implementation, listed in BACKENDS (the one registry the dispatcher reads): the module
spa_kernels/ops/<op>/<file>.py (reference.py is "torch"). Every kernel backend follows one protocol, whatever the
op: `forward(...)` returns the outputs plus what the backward needs, `backward(grad, ...)` returns the input
gradients, and the op's autograd.Function (ops/<op>/function.py) is handed the resolved backend module. So "the CUDA
backward of linear_logprobs" is `backward` in spa_kernels/ops/linear_logprobs/cuda.py. The "torch" reference
backends are plain PyTorch under autograd.

Device and dtype rules every backend shares are checked here; rules particular to one op are declared beside its
entry (REQUIRES). `impl="auto"` takes the first usable backend in the order for the tensors' device;
SPA_KERNELS_IMPL=<name> replaces "auto" (an explicit impl= argument wins). Naming an implementation that cannot run
raises ValueError with the reasons and what is usable instead.

On CUDA tensors the order between "cuda" and "triton" is measured, per op, dtype and vocabulary size, on the GPU in
hand and cached on disk (spa_kernels/autotune.py; `python -m spa_kernels.autotune` fills the table ahead of time).
AUTO_ORDER_CUDA_DEFAULT only applies where nothing was measured (SPA_KERNELS_AUTOTUNE=0, or a failed measurement).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

from . import _ext

IMPLS = ("torch", "cpu", "triton", "cuda")
_FILE = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}
OPS = ("logprobs", "spa_logprobs", "linear_logprobs", "linear_spa_logprobs")
# op -> impl -> backend module. Every op has all four implementations.
BACKENDS: dict[str, dict[str, str]] = {
    op: {impl: f"spa_kernels.ops.{op}.{_FILE[impl]}" for impl in IMPLS} for op in OPS
}
_DTYPES = {
    "torch": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def same_dtype(a: str, b: str) -> Callable[..., str | None]:
    """A rule: tensors `a` and `b` (when given) share a dtype (kernels compiled for one element type)."""
    def rule(**tensors) -> str | None:
        x, y = tensors.get(a), tensors.get(b)
        if x is not None and y is not None and x.dtype != y.dtype:
            return f"{a} ({x.dtype}) and {b} ({y.dtype}) must share a dtype"
        return None
    return rule


# (op, impl) -> rules beyond the shared device / dtype ones; each returns None or why the backend cannot run.
REQUIRES: dict[tuple[str, str], tuple[Callable[..., str | None], ...]] = {
    ("spa_logprobs", "cpu"): (same_dtype("logits", "ref_logits"),),
    ("spa_logprobs", "cuda"): (same_dtype("logits", "ref_logits"),),
    ("linear_spa_logprobs", "cpu"): (same_dtype("weight", "ref_weight"),),
    ("linear_spa_logprobs", "cuda"): (same_dtype("weight", "ref_weight"),),
}
# "auto" on CPU tensors. Triton is never picked automatically on the CPU: its interpreter is for testing only.
AUTO_ORDER_CPU = ("cpu", "torch")
# "auto" on CUDA tensors when there is no measurement (see the module docstring).
AUTO_ORDER_CUDA_DEFAULT = ("triton", "cuda", "torch")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure makes triton unavailable
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def impl_unavailable_reason(impl: str) -> str | None:
    """None if `impl` can run in this process at all (for some device), else why not."""
    if impl == "torch":
        return None
    if impl == "cpu":
        return _ext.cpu_unavailable_reason()
    if impl == "cuda":
        return _ext.cuda_unavailable_reason()
    if impl == "triton":
        err = _triton_import_error()
        if err:
            return err
        if not torch.cuda.is_available() and not _triton_interpret():
            return "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
        return None
    return f"unknown implementation {impl!r}; expected one of {IMPLS}"


def available_impls() -> set[str]:
    """The implementations usable in this process, e.g. {"torch", "cpu", "triton", "cuda"}."""
    return {name for name in IMPLS if impl_unavailable_reason(name) is None}


def backend(op: str, impl: str) -> ModuleType:
    """The backend module of `op` for `impl` (imported on first use); KeyError for an unknown op or impl."""
    return importlib.import_module(BACKENDS[op][impl])


def _backend_module(op: str, impl: str) -> tuple[ModuleType | None, str | None]:
    if op not in BACKENDS:
        return None, f"unknown op {op!r}; expected one of {OPS}"
    try:
        return backend(op, impl), None
    except ImportError as e:
        return None, f"{BACKENDS[op][impl]} could not be imported ({e})"


def _device_dtype_reason(impl: str, tensors: dict[str, torch.Tensor | None]) -> str | None:
    for tname, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        if t.dtype not in _DTYPES[impl]:
            return f"{tname} has dtype {t.dtype}, {impl} supports {', '.join(str(d) for d in _DTYPES[impl])}"
    for tname, t in tensors.items():
        if t is None:
            continue
        dev = t.device.type
        if impl == "cpu" and dev != "cpu":
            return f"{tname} is on {t.device}, the cpu implementation needs CPU tensors"
        if impl == "cuda" and dev != "cuda":
            return f"{tname} is on {t.device}, the cuda implementation needs CUDA tensors"
        if impl == "triton" and dev != "cuda" and not (dev == "cpu" and _triton_interpret()):
            return f"{tname} is on {t.device}, the triton implementation needs CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def unusable_reason(op: str, impl: str, tensors: dict[str, torch.Tensor | None], **options) -> str | None:
    """None if `impl` can run `op` on these tensors, else why not."""
    reason = impl_unavailable_reason(impl)
    if reason:
        return reason
    reason = _device_dtype_reason(impl, tensors)
    if reason:
        return reason
    module, reason = _backend_module(op, impl)
    if module is None:
        return reason
    for rule in REQUIRES.get((op, impl), ()):
        reason = rule(**tensors, **options)
        if reason:
            return reason
    return None


def auto_order(op: str, device: torch.device, tensors: dict[str, torch.Tensor | None] | None = None) -> tuple[str, ...]:
    """The implementations "auto" tries, in order, for `op` on these tensors."""
    if device.type != "cuda":
        return AUTO_ORDER_CPU
    static = AUTO_ORDER_CUDA_DEFAULT
    if tensors is None:
        return static
    from . import autotune  # imported on first use: the table is only read for impl="auto" on CUDA tensors

    measured = autotune.order_for(op, device, tensors)
    if not measured:
        return static
    return tuple(measured) + tuple(n for n in static if n not in measured)


def resolve(op: str, impl: str, tensors: dict[str, torch.Tensor | None], **options) -> tuple[str, ModuleType]:
    """Returns (implementation name, backend module) for this call, or raises ValueError saying why not."""
    if impl == "auto":
        impl = os.environ.get("SPA_KERNELS_IMPL", "auto").strip() or "auto"
        if impl != "auto" and impl not in IMPLS:
            raise ValueError(f"SPA_KERNELS_IMPL={impl!r} is not one of {('auto',) + IMPLS}")
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {('auto',) + IMPLS}")
    device = next((t.device for t in tensors.values() if t is not None), torch.device("cpu"))
    if impl != "auto":
        reason = unusable_reason(op, impl, tensors, **options)
        if reason is not None:
            usable = [n for n in IMPLS if unusable_reason(op, n, tensors, **options) is None]
            raise ValueError(f"impl={impl!r} cannot run {op} here: {reason}. Usable for these inputs: "
                             f"{', '.join(usable) or 'none'} (or impl='auto')")
        return impl, _backend_module(op, impl)[0]
    reasons = {}
    for name in auto_order(op, device, tensors):
        reason = unusable_reason(op, name, tensors, **options)
        if reason is None:
            return name, _backend_module(op, name)[0]
        reasons[name] = reason
    raise ValueError(f"no implementation can run {op} on these inputs: "
                     + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
