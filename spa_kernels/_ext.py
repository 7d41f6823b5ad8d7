"""Guarded import of the compiled module spa_kernels._C and what it was built with.

Nothing here raises at import time: a missing or unusable extension only makes the "cpu" / "cuda" implementations
unavailable, with a reason that says how to rebuild.
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import torch

REBUILD_HINT = (
    "rebuild with `pip install --no-build-isolation -e .` from the repository (torch must already be installed; "
    "set CUDA_HOME=/path/to/cuda for the CUDA kernels; SPA_SKIP_CUDA_BUILD=1 builds only the CPU kernels)"
)

try:
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    if not any(f.startswith("_C.") and f.endswith((".so", ".pyd")) for f in os.listdir(os.path.dirname(__file__))):
        _IMPORT_ERROR = "the extension was not built"
    else:
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def build_status() -> dict[str, Any]:
    """What setup.py recorded about the build (attempted / built / failed / skipped parts)."""
    path = os.path.join(os.path.dirname(__file__), "_build_status.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@cache
def build_info() -> dict[str, Any]:
    if _C is None:
        return {"cpu": False, "cuda": False, "import_error": _IMPORT_ERROR}
    return dict(_C.build_info())


def _cpu_supports(capability: str) -> bool:
    if capability in ("", "DEFAULT"):
        return True
    try:
        running = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    except Exception:  # noqa: BLE001 - old torch: trust the build
        return True
    order = ["DEFAULT", "AVX2", "AVX512"]
    if running not in order or capability not in order:
        return running == capability
    return order.index(running) >= order.index(capability)


def _why_not_built(part: str) -> str:
    status = build_status()
    for key, err in status.get("failed", {}).items():
        if part in key.split("+"):
            return f"the {part} kernels failed to compile at install time ({err.splitlines()[-1][:300]}); {REBUILD_HINT}"
    if part in status.get("skipped", {}):
        return f"the {part} kernels were not built: {status['skipped'][part]}"
    if "all" in status.get("skipped", {}):
        return f"no kernels were built: {status['skipped']['all']}"
    return f"spa_kernels._C was built without {part} kernels; {REBUILD_HINT}"


@cache
def cpu_unavailable_reason() -> str | None:
    """None when the C++ CPU kernels can run in this process, else why not."""
    if _C is None:
        return f"spa_kernels._C is not importable ({_IMPORT_ERROR}); {REBUILD_HINT}"
    info = build_info()
    if not info.get("cpu"):
        return _why_not_built("cpu")
    cap = info.get("cpu_capability", "DEFAULT")
    if not _cpu_supports(cap):
        return (f"the CPU kernels were built for {cap} but this CPU supports "
                f"{torch.backends.cpu.get_cpu_capability()}; rebuild with SPA_CPU_CAPABILITY=DEFAULT")
    return None


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA kernels can run in this process, else why not (not cached: CUDA may appear later)."""
    if _C is None:
        return f"spa_kernels._C is not importable ({_IMPORT_ERROR}); {REBUILD_HINT}"
    if not build_info().get("cuda"):
        return _why_not_built("cuda")
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def kernels() -> Any:
    """The compiled module; only call after checking the matching *_unavailable_reason()."""
    if _C is None:
        raise RuntimeError(f"spa_kernels._C is not importable ({_IMPORT_ERROR}); {REBUILD_HINT}")
    return _C
