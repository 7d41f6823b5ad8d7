"""Triton kernels for token / sequence log-probs (impl="triton"): one program per token row.

Forward: the row is streamed once in BLOCK_V chunks; each lane keeps its own running (max, sum of exp) in float32
(one exp per element, no cross-thread reduction inside the loop), merged once at the end; the label's logit is read
directly. Out-of-range labels are never read: the kernel lowers a flag to the first bad row and the launcher raises
the shared ValueError. Backward: the softmax is recomputed from the saved log-sum-exp and the gradient written
(optionally into the logits buffer itself); the label term g * (1 - p) is formed in float32 and rounded once, which
is where a bfloat16 gradient keeps its signal.

Tuning: the forward is autotuned over BLOCK_V x num_warps keyed on V (and the dtypes); the configs were chosen as
the usual range for a bandwidth-bound row kernel (4-16 elements per thread, 16-byte loads). The backward may run in
place, where timing a config would overwrite the logits it reads, so it takes a fixed heuristic instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton

_FWD_CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4),
    triton.Config({"BLOCK_V": 2048}, num_warps=8),
    triton.Config({"BLOCK_V": 4096}, num_warps=8),
    triton.Config({"BLOCK_V": 4096}, num_warps=16),
    triton.Config({"BLOCK_V": 8192}, num_warps=16),
]
_INTERPRET_BLOCK_V = 1024  # numpy-vectorised under the interpreter: fewer, larger blocks are faster


@triton.jit
def online_lse_update(m, s, x):
    """One step of a per-lane online log-sum-exp: (m, s) summarise the values seen so far as s * exp(m); x is the
    next value of each lane. exp(-|x - m|) is the only exp: it rescales the old sum when x is the new max and is
    the new term otherwise. -inf values leave the state untouched (no -inf - -inf = NaN)."""
    d = tl.exp(-tl.abs(x - m))
    d = tl.where(x == float("-inf"), 0.0, d)
    s = tl.where(x > m, s * d + 1.0, s + d)
    return tl.maximum(m, x), s


@triton.jit
def online_lse_finish(m, s):
    """Merges per-lane states into the row's log-sum-exp (all -inf -> -inf, as torch.logsumexp). A NaN logit has
    made its lane's sum NaN; a +inf logit gives NaN too, as torch.log_softmax does for every entry of such a row."""
    m_row = tl.max(m, axis=0)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_safe), axis=0))
    return tl.where(m_row == float("inf"), float("nan"), lse)


@_triton.autotune(_FWD_CONFIGS, key=["V"], interpret=triton.Config({"BLOCK_V": _INTERPRET_BLOCK_V}))
@triton.jit(do_not_specialize=["T", "ignore_index"])
def _logprobs_fwd_kernel(logits_ptr, labels_ptr, token_ptr, lse_ptr, bad_row_ptr, T, V, stride_n, stride_t,
                         ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    in_range = (label >= 0) & (label < V)
    ignored = label == ignore_index
    tl.atomic_min(bad_row_ptr, row, mask=~ignored & ~in_range)
    active = ~ignored & in_range
    x_ptr = logits_ptr + (row // T) * stride_n + (row % T) * stride_t
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, tl.where(active, V, 0), BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = _triton.scale(tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32), inv_temperature)
        m, s = online_lse_update(m, s, tl.where(ok, x, float("-inf")))
    lse = online_lse_finish(m, s)
    z_label = _triton.scale(tl.load(x_ptr + tl.where(active, label, 0), mask=active, other=0.0).to(tl.float32),
                            inv_temperature)
    tl.store(token_ptr + row, tl.where(active, z_label - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))


@triton.jit(do_not_specialize=["T", "ignore_index"])
def _logprobs_bwd_kernel(grad_token_ptr, logits_ptr, labels_ptr, lse_ptr, grad_ptr, T, V, stride_n, stride_t,
                         grad_stride_n, grad_stride_t, ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_token_ptr + row)
    # out-of-range labels were rejected by the forward; such rows get zeros here rather than an out-of-bounds read
    active = (label != ignore_index) & (label >= 0) & (label < V) & (g != 0.0)
    coef = tl.where(active, g * inv_temperature, 0.0)
    lse = tl.load(lse_ptr + row)
    n = row // T
    t = row % T
    x_ptr = logits_ptr + n * stride_n + t * stride_t
    out_ptr = grad_ptr + n * grad_stride_n + t * grad_stride_t  # may alias x_ptr: each block is read, then written
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = _triton.scale(tl.load(x_ptr + offs, mask=ok & active, other=0.0).to(tl.float32), inv_temperature)
        p = tl.exp(x - lse)
        grad = tl.where(offs == label, coef * (1.0 - p), -coef * p)
        tl.store(out_ptr + offs, tl.where(active, grad, 0.0).to(grad_ptr.dtype.element_ty), mask=ok)


def _bwd_launch_config(V: int) -> dict:
    if _triton.INTERPRET:
        return {"BLOCK_V": _INTERPRET_BLOCK_V, "num_warps": 4}
    block = min(4096, triton.next_power_of_2(V))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inv_temperature: float):
    """logits [N, T, V] (unit stride over V, any N/T strides), labels [N, T] int64 ->
    (token_logprobs [N, T] float32, lse [N, T] float32); ignored tokens get 0 in both."""
    N, T, V = logits.shape
    token = torch.empty(N, T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(token)
    if N * T == 0:
        return token, lse
    labels = labels.contiguous()
    bad_row = _triton.new_bad_row_flag(logits.device)
    _logprobs_fwd_kernel[(N * T,)](logits, labels, token, lse, bad_row, T, V, logits.stride(0), logits.stride(1),
                                   ignore_index, inv_temperature)
    _triton.raise_if_bad_label(bad_row, labels, V, ignore_index)
    return token, lse


def backward(grad_token, logits, labels, lse, ignore_index: int, inv_temperature: float, grad_out=None):
    """-> grad_logits [N, T, V] in logits' dtype; written into grad_out when given (grad_out may be logits itself:
    in-place backward). Ignored tokens get zero rows."""
    N, T, V = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_out is None else grad_out
    if grad.shape != logits.shape or grad.dtype != logits.dtype or (V > 1 and grad.stride(2) != 1):
        raise ValueError(f"grad_out must be {list(logits.shape)} {logits.dtype} with unit stride over V, got "
                         f"{list(grad.shape)} {grad.dtype} strides {grad.stride()}")
    if N * T == 0 or V == 0:
        return grad
    grad_token = grad_token.float().contiguous()
    _logprobs_bwd_kernel[(N * T,)](grad_token, logits, labels.contiguous(), lse.contiguous(), grad, T, V,
                                   logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), ignore_index,
                                   inv_temperature, **_bwd_launch_config(V))
    return grad
