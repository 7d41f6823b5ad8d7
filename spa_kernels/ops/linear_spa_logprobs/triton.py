"""SPA triple log-probs straight from hidden states with Triton (impl="triton").

Forward (_linear_spa_fwd_kernel): as linear_logprobs/triton.py's forward, with the reference model's logits tile
computed in the same program from ref_hidden / ref_weight (its own hidden size), so each vocabulary tile yields
policy z, reference z_ref and the extrapolated (1 + lam) z - lam z_ref together; three online log-sum-exps per
token, labels' logits picked in the same pass. Nothing of size [tokens, V] is stored. Backward: only the policy
log-probs carry a gradient, so it is linear_logprobs' backward with temperature 1.

Tuning: autotuned like linear_logprobs, over smaller tiles (two float32 accumulators live at once), keyed on
(V, H, H_ref), the dtypes, the token-count bucket and the alignment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton
from ..linear_logprobs.triton import (
    _INTERPRET_TILE,
    _kernel_flags,
    _slices,
    aligned,
    linear_backward,
    logits_tile,
    m_bucket,
    merge_lse,
    tile_lse_update,
)

_SPA_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),  # fits any GPU in fp32
]  # (128x128 over 8 warps, two 64-per-thread accumulators, spilled 828 bytes on sm_80: compile_check)


def _even_k(args) -> bool:
    return args["H"] % args["BLOCK_K"] == 0 and args["H_ref"] % args["BLOCK_K"] == 0


@_triton.autotune(_SPA_TILE_CONFIGS, key=["V", "H", "H_ref", "m_bucket", "aligned"],
                  interpret=_INTERPRET_TILE,
                  shared_memory=_triton.dot_tile_bytes("h_ptr", "w_ptr", "rh_ptr", "rw_ptr"))
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=["M", "slice_width", "m_bucket", "aligned"])
def _linear_spa_fwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, labels_ptr, part_ptr, M, V, H, H_ref,
                           stride_hm, stride_hk, stride_wv, stride_wk, stride_rhm, stride_rhk, stride_rwv,
                           stride_rwk, lam, slice_width, m_bucket, aligned, HAS_BIAS: tl.constexpr,
                           HAS_REF_BIAS: tl.constexpr,
                           DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part [8, n_slices, M]: per vocabulary slice, (max, sum, label logit) of z, then (max, sum) of the
    extrapolated logits, then (max, sum, label logit) of z_ref."""
    pid_m = tl.program_id(0)
    vslice = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_lo = vslice.to(tl.int64) * slice_width
    v_hi = tl.minimum(v_lo + slice_width, V)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    picked = tl.zeros([BLOCK_M], tl.float32)
    m_ext = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_ext = tl.zeros([BLOCK_M], tl.float32)
    m_ref = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_ref = tl.zeros([BLOCK_M], tl.float32)
    picked_ref = tl.zeros([BLOCK_M], tl.float32)
    for v in range(v_lo, v_hi, BLOCK_N):
        cols = v + tl.arange(0, BLOCK_N)
        col_ok = cols < v_hi
        is_label = tl.arange(0, BLOCK_N)[None, :] == (labels - v).to(tl.int32)[:, None]  # int32: fewer registers
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hm, stride_hk, stride_wv,
                        stride_wk, HAS_BIAS, EVEN_K, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m, s = tile_lse_update(m, s, z)
        picked += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        zr = logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_ok, cols, col_ok, H_ref, stride_rhm, stride_rhk,
                         stride_rwv, stride_rwk, HAS_REF_BIAS, EVEN_K, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        zr = tl.where(col_ok[None, :], zr, float("-inf"))
        m_ref, s_ref = tile_lse_update(m_ref, s_ref, zr)
        picked_ref += tl.sum(tl.where(is_label, zr, 0.0), axis=1)
        # a token the policy rules out stays ruled out (also where the reference rules it out: no -inf + inf)
        m_ext, s_ext = tile_lse_update(m_ext, s_ext, tl.where(z == float("-inf"), z, (1.0 + lam) * z - lam * zr))
    n_slices = tl.num_programs(1).to(tl.int64)
    out = part_ptr + vslice * M + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_slices * M, s, mask=row_ok)
    tl.store(out + 2 * n_slices * M, picked, mask=row_ok)
    tl.store(out + 3 * n_slices * M, m_ext, mask=row_ok)
    tl.store(out + 4 * n_slices * M, s_ext, mask=row_ok)
    tl.store(out + 5 * n_slices * M, m_ref, mask=row_ok)
    tl.store(out + 6 * n_slices * M, s_ref, mask=row_ok)
    tl.store(out + 7 * n_slices * M, picked_ref, mask=row_ok)


def linear_spa_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float):
    """-> (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [M] float32."""
    M, H = hidden.shape
    V, H_ref = ref_weight.shape
    n_slices, width = _slices(M, V, hidden.device)
    part = torch.empty(8, n_slices, M, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_slices)
    _linear_spa_fwd_kernel[grid](hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, part, M, V, H, H_ref,
                                 hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                                 ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0),
                                 ref_weight.stride(1), lam, width, m_bucket(M),
                                 aligned(hidden, weight, ref_hidden, ref_weight), HAS_BIAS=bias is not None,
                                 HAS_REF_BIAS=ref_bias is not None,
                                 **_kernel_flags(hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    lse, lse_ext, lse_ref = merge_lse(part[0], part[1]), merge_lse(part[3], part[4]), merge_lse(part[5], part[6])
    z_y, zr_y = part[2].sum(0), part[7].sum(0)
    ext_y = torch.where(z_y == float("-inf"), z_y, (1.0 + lam) * z_y - lam * zr_y)
    return z_y - lse, lse, zr_y - lse_ref, ext_y - lse_ext


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float, chunk_size: int | None):
    """The linear_spa_logprobs backend protocol's forward (chunk_size only shapes the backward)."""
    return linear_spa_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam)


backward = linear_backward  # linear_logprobs' Triton backward: only the policy log-probs carry a gradient
