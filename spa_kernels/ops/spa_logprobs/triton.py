"""Triton kernel for the SPA triple log-probs (impl="triton"): one program per token row reads the policy and the
reference logits once and keeps three per-lane online log-sum-exps (policy z, reference z_ref and the extrapolated
(1 + lam) z - lam z_ref, which stays -inf where z is -inf). The backward is the log-prob backward of the policy
logits (logprobs/triton.py) with temperature 1. Tuning as in logprobs/triton.py (forward autotuned on V), without
its widest block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton
from ..logprobs.triton import (
    _FWD_CONFIGS,
    _INTERPRET_BLOCK_V,
    backward,  # noqa: F401 - the backward this op uses
    online_lse_finish,
    online_lse_update,
)

# Three running (max, sum) pairs per lane: BLOCK_V = 8192 over 16 warps (16 elements per thread, six state arrays)
# spills registers, so the SPA forward tries the log-prob forward's blocks up to 4096.
_SPA_FWD_CONFIGS = [c for c in _FWD_CONFIGS if c.kwargs["BLOCK_V"] <= 4096]


@triton.jit
def _extrapolate(z, z_ref, lam):
    # a token the policy rules out stays ruled out, also where the reference rules it out too (padded vocabulary)
    return tl.where(z == float("-inf"), z, (1.0 + lam) * z - lam * z_ref)


@_triton.autotune(_SPA_FWD_CONFIGS, key=["V"], interpret=triton.Config({"BLOCK_V": _INTERPRET_BLOCK_V}))
@triton.jit(do_not_specialize=["T", "ignore_index"])
def _spa_logprobs_fwd_kernel(logits_ptr, ref_logits_ptr, labels_ptr, token_ptr, lse_ptr, ref_token_ptr,
                             ext_token_ptr, bad_row_ptr, T, V, stride_n, stride_t, ref_stride_n, ref_stride_t,
                             ignore_index, lam, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    in_range = (label >= 0) & (label < V)
    ignored = label == ignore_index
    tl.atomic_min(bad_row_ptr, row, mask=~ignored & ~in_range)
    active = ~ignored & in_range
    n = row // T
    t = row % T
    x_ptr = logits_ptr + n * stride_n + t * stride_t
    xr_ptr = ref_logits_ptr + n * ref_stride_n + t * ref_stride_t
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    m_ref = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_ref = tl.zeros([BLOCK_V], tl.float32)
    m_ext = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_ext = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, tl.where(active, V, 0), BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.where(ok, tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32), float("-inf"))
        zr = tl.where(ok, tl.load(xr_ptr + offs, mask=ok, other=0.0).to(tl.float32), float("-inf"))
        m, s = online_lse_update(m, s, z)
        m_ref, s_ref = online_lse_update(m_ref, s_ref, zr)
        m_ext, s_ext = online_lse_update(m_ext, s_ext, _extrapolate(z, zr, lam))
    lse = online_lse_finish(m, s)
    safe_label = tl.where(active, label, 0)
    z_y = tl.load(x_ptr + safe_label, mask=active, other=0.0).to(tl.float32)
    zr_y = tl.load(xr_ptr + safe_label, mask=active, other=0.0).to(tl.float32)
    tl.store(token_ptr + row, tl.where(active, z_y - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    tl.store(ref_token_ptr + row, tl.where(active, zr_y - online_lse_finish(m_ref, s_ref), 0.0))
    tl.store(ext_token_ptr + row, tl.where(active, _extrapolate(z_y, zr_y, lam) - online_lse_finish(m_ext, s_ext),
                                           0.0))


def forward(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, lam: float):
    """logits / ref_logits [N, T, V] (unit stride over V, any N/T strides; dtypes may differ), labels [N, T] ->
    (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [N, T] float32; ignored tokens get 0."""
    N, T, V = logits.shape
    outs = [torch.empty(N, T, dtype=torch.float32, device=logits.device) for _ in range(4)]
    if N * T == 0:
        return tuple(outs)
    labels = labels.contiguous()
    bad_row = _triton.new_bad_row_flag(logits.device)
    _spa_logprobs_fwd_kernel[(N * T,)](logits, ref_logits, labels, *outs, bad_row, T, V, logits.stride(0),
                                       logits.stride(1), ref_logits.stride(0), ref_logits.stride(1), ignore_index,
                                       lam)
    _triton.raise_if_bad_label(bad_row, labels, V, ignore_index)
    return tuple(outs)
