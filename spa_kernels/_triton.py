"""Shared plumbing of the Triton backends (spa_kernels/ops/*/triton.py): interpreter detection, autotuning that
collapses to one configuration under TRITON_INTERPRET=1, the tl.dot precision for a dtype, and the label-range error.

Interpreter caveats the kernels work around (triton 3.8): bfloat16 values are held as their raw 16-bit patterns, so
arithmetic and tl.dot on bfloat16 operands give garbage. Kernels therefore convert every load to float32 before any
arithmetic, and feed tl.dot float32 operands when DOT_F32 is set (only ever under the interpreter).
"""

from __future__ import annotations

import os

import torch
import triton

from ._validation import NO_BAD_LABEL, check_label_flag, label_check

# Read once, like triton itself: TRITON_INTERPRET must be set before any @triton.jit function is defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

def autotune(configs: list[triton.Config], key: list[str], interpret: triton.Config, **kwargs):
    """triton.autotune over `configs` on a GPU; under the interpreter only `interpret` (a single config is never
    benchmarked), so CPU tests compile and run each kernel once per call."""
    return triton.autotune(configs=[interpret] if INTERPRET else configs, key=key, **kwargs)


def dot_precision() -> str:
    """tl.dot input precision for float32 operands, following torch.set_float32_matmul_precision ("highest", the
    default, means full float32 as torch.mm does). Reduced-precision operands ignore it."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_f32(*dtypes: torch.dtype) -> bool:
    """Whether the kernels must upcast tl.dot operands (the interpreter's bfloat16 tl.dot is wrong)."""
    return INTERPRET and torch.bfloat16 in dtypes


def new_bad_row_flag(device: torch.device) -> torch.Tensor:
    """[1] int64 the kernels lower (tl.atomic_min) to the first flat row whose label is out of range."""
    return torch.full((1,), NO_BAD_LABEL, dtype=torch.int64, device=device)


def raise_if_bad_label(flag: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises the shared ValueError (first bad position) when a kernel flagged an out-of-range label: always in
    the call (one host sync), whatever validate= says; the kernels themselves never read out of bounds for such a
    label."""
    with label_check("sync"):
        check_label_flag(flag, labels, vocab, ignore_index)


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors, to size grids; a small stand-in under the interpreter so split paths get tested."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
