"""acc += a @ b into a float32 accumulator for bfloat16 / float16 operands, never rounding the product to the
operands' dtype first. Used by the chunked linear backends (grad_weight) and the Triton linear backward
(grad_hidden)."""

from __future__ import annotations

import torch

_PROBED: dict[torch.device, bool] = {}


def float32_out_addmm(device: torch.device) -> bool:
    """Whether torch.addmm(acc_f32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc_f32) accumulates in place on
    this device (newer torch on CUDA; elsewhere `acc` must have the inputs' dtype). Probed once per device, on
    values, rather than read off a version number; only a definite answer is kept (an unrelated CUDA error is
    raised, and nothing is probed while a CUDA graph is being captured)."""
    if device in _PROBED:
        return _PROBED[device]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # the sliced fallback is correct too; probe outside the capture
    try:
        acc = torch.ones(2, 2, device=device)
        a = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        works = bool((acc == 4).all())
    except (TypeError, NotImplementedError):
        works = False
    except RuntimeError as e:
        if "dtype" not in str(e).lower():
            raise
        works = False
    _PROBED[device] = works
    return works


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_bytes: int) -> None:
    """acc += a @ b. With float32 `acc` and reduced-precision a, b: the GEMM accumulates straight into acc where
    torch supports that (float32_out_addmm); otherwise row slices of the product, at most slice_bytes each, are
    formed in float32 and added, never a whole [rows, cols] product (b is upcast once: a float32 copy of b)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif float32_out_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        rows = max(1, slice_bytes // max(1, (a.shape[1] + b.shape[1]) * 4))
        b32 = b.float()
        for r in range(0, a.shape[0], rows):
            acc[r:r + rows].addmm_(a[r:r + rows].float(), b32)
