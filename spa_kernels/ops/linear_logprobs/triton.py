"""Log-probs straight from hidden states with Triton (impl="triton"): logits = hidden @ weight.T (+ bias) exist only
as [BLOCK_M, BLOCK_N] tiles in registers, never as [N, T, V] nor as a [chunk, V] float32 log-softmax.

Forward (_linear_lse_fwd_kernel): a program owns BLOCK_M tokens and one contiguous slice of the vocabulary; it walks
the slice in BLOCK_N tiles, each tile a tl.dot loop over H (tensor cores on a GPU, float32 accumulation), and folds
every tile into a per-token online log-sum-exp while picking the label's logit from the same tile. Several
vocabulary slices run in parallel when there are too few token tiles to fill the GPU; their (max, sum, label logit)
partials are merged on the host ([slices, M] floats). Only the per-token log-sum-exp is saved for backward.

Backward, one vocabulary chunk at a time (the chunk is sized so its gradient tile fits the chunk_size budget):
_linear_grad_logits_kernel recomputes the logits tile by tile and writes d logp / d logits for the chunk in the
input dtype (the label term formed in float32 and rounded once); then grad_weight[chunk] = G.T @ hidden is complete
in one GEMM written straight into the gradient (float32 accumulation inside the GEMM; no [V, H] float32 buffer), and
grad_hidden += G @ weight[chunk] accumulates across chunks in a float32 [M, H] buffer. Because the log-sum-exp is
known from the forward, vocabulary chunks are independent.

Tuning: both kernels are autotuned over a few (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tiles keyed on (V, H), the
dtypes, a power-of-two bucket of the token count and the rows' alignment (AUTOTUNE_KEY) - never on the exact number
of tokens, so new sequence lengths neither re-tune nor recompile (token counts are excluded from integer
specialisation). The tiles are the usual Hopper/Ampere GEMM shapes that fit the register file with a float32
accumulator; a tile whose pipelined operands do not fit the GPU's shared memory (float32 128-wide tiles on sm_80 /
sm_86) is pruned before autotuning. float32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's
default) is an exact float32 tl.dot, "high" / "medium" (or torch.backends.cuda.matmul.allow_tf32 = True) use TF32
tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton
from ..._accumulate import accumulate_mm
from .chunked import default_chunk_size

# At most 64 float32 accumulators per thread (BLOCK_M * BLOCK_N / (32 * num_warps)): with the tile's operands,
# the label compare and the softcap, that keeps every bf16 / fp16 configuration within 255 registers on sm_90
# without spilling (python -m spa_kernels.compile_check). 128 accumulators per thread (128x128 over 4 warps, 128x256
# over 8) spilled up to 668 bytes, and 128x256 over 16 warps meets the 128-register cap of 512 threads.
_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    # fits every GPU's shared memory in float32 too (48 KiB), and suits float32's FMA tl.dot
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
# Under the interpreter: small tiles so that the tests' odd shapes span several tiles in every dimension.
_INTERPRET_TILE = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})
# Vocabulary slices (forward) and chunks (backward) start on multiples of BLOCK_N, so tiles never straddle two.
VOCAB_ALIGN = 32 if _triton.INTERPRET else 256
# A forward vocabulary slice is at least this wide (smaller under the interpreter, so tests cover several slices).
MIN_SLICE = 64 if _triton.INTERPRET else 4096
GROUP_M = 8  # backward tile order: GROUP_M token tiles sweep the vocabulary together, sharing weight tiles in L2


def _even_k(args) -> bool:
    return args["H"] % args["BLOCK_K"] == 0


# What changes the best tile, besides the dtypes (always part of Triton's key): the vocabulary and hidden sizes, the
# number of tokens in power-of-two buckets (a few tokens want narrow tiles, thousands want wide ones) and whether the
# rows are 16-byte aligned. Never the exact token count, so new sequence lengths reuse the tuned tiles.
AUTOTUNE_KEY = ["V", "H", "m_bucket", "aligned"]


def m_bucket(M: int) -> int:
    """log2 bucket of the token count, capped at 2**14 tokens."""
    return min(max(M, 1).bit_length(), 15)


def aligned(*tensors) -> int:
    """1 when every tensor has unit stride over its last dimension and a 16-byte aligned base and row stride
    (vectorised tile loads), else 0."""
    for t in tensors:
        if t is None:
            continue
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return 0
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
            return 0
    return 1


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hm, stride_hk, stride_wv, stride_wk,
                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 tile of hidden[rows] @ weight[cols].T (+ bias[cols]); rows / cols are int64."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk
    b_ptrs = w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk
    for k in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k + ks) < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def softcap_tile(z, softcap):
    """softcap * tanh(z / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (exact at +-inf, no libdevice needed)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))


@triton.jit
def tile_lse_update(m, s, z):
    """Folds a [BLOCK_M, BLOCK_N] tile into per-row online log-sum-exp states (m, s) (-inf safe)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
    return m_new, s


@_triton.autotune(_TILE_CONFIGS, key=AUTOTUNE_KEY, interpret=_INTERPRET_TILE,
                  shared_memory=_triton.dot_tile_bytes("h_ptr", "w_ptr"))
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=["M", "slice_width", "m_bucket", "aligned"])
def _linear_lse_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, M, V, H, stride_hm, stride_hk, stride_wv,
                           stride_wk, inv_temperature, softcap, slice_width, m_bucket, aligned, HAS_BIAS: tl.constexpr,
                           SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                           PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part [3, n_slices, M]: per vocabulary slice, the running max, the sum of exp(z - max), the label's logit."""
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
    for v in range(v_lo, v_hi, BLOCK_N):
        cols = v + tl.arange(0, BLOCK_N)
        col_ok = cols < v_hi
        z = _triton.scale(logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hm, stride_hk,
                                      stride_wv, stride_wk, HAS_BIAS, EVEN_K, DOT_F32, PRECISION, BLOCK_M, BLOCK_N,
                                      BLOCK_K), inv_temperature)
        if SOFTCAP:
            z = softcap_tile(z, softcap)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m, s = tile_lse_update(m, s, z)
        # the label's column within this tile, compared in int32: an int64 [BLOCK_M, BLOCK_N] compare costs the
        # registers that made the reduced-precision tiles spill
        label_col = (labels - v).to(tl.int32)
        picked += tl.sum(tl.where(tl.arange(0, BLOCK_N)[None, :] == label_col[:, None], z, 0.0), axis=1)
    n_slices = tl.num_programs(1).to(tl.int64)
    out = part_ptr + vslice * M + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_slices * M, s, mask=row_ok)
    tl.store(out + 2 * n_slices * M, picked, mask=row_ok)


@_triton.autotune(_TILE_CONFIGS, key=AUTOTUNE_KEY, interpret=_INTERPRET_TILE,
                  shared_memory=_triton.dot_tile_bytes("h_ptr", "w_ptr"))
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=["M", "v0", "n_cols", "m_bucket", "aligned"])
def _linear_grad_logits_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, coef_ptr, g_ptr, M, V, H, v0, n_cols,
                               stride_hm, stride_hk, stride_wv, stride_wk, inv_temperature, softcap, m_bucket, aligned,
                               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                               DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                               GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """g [M, n_cols] (contiguous) = coef * (onehot(label) - softmax(z))[:, v0:v0 + n_cols], coef = dL/dlogp / T;
    with SOFTCAP, z is the capped logit c and g is multiplied by dc/d(z / T) = 1 - (c / softcap)^2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int32: n_cols < 2**31
    col_ok = local < n_cols
    cols = v0 + local.to(tl.int64)
    z = _triton.scale(logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hm, stride_hk, stride_wv,
                                  stride_wk, HAS_BIAS, EVEN_K, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K),
                      inv_temperature)
    if SOFTCAP:
        z = softcap_tile(z, softcap)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    label_col = (tl.load(labels_ptr + rows, mask=row_ok, other=-1) - v0).to(tl.int32)  # int32 compare (registers)
    p = tl.exp(z - lse[:, None])
    g = tl.where(local[None, :] == label_col[:, None], coef[:, None] * (1.0 - p), -coef[:, None] * p)
    if SOFTCAP:
        c = z / softcap
        g = g * (1.0 - c * c)
    tl.store(g_ptr + rows[:, None] * n_cols + local[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _kernel_flags(*tensors) -> dict:
    dtypes = [t.dtype for t in tensors if t is not None]
    dot_f32 = _triton.dot_f32(*dtypes)
    # the precision only means something for float32 operands; reduced-precision tiles keep triton's default
    precision = _triton.dot_precision() if dot_f32 or torch.float32 in dtypes else "tf32"
    return {"DOT_F32": dot_f32, "PRECISION": precision}


def _slices(M: int, V: int, device: torch.device) -> tuple[int, int]:
    """(number of vocabulary slices, slice width) for the forward grid: enough programs for ~2 waves of the GPU
    when token tiles alone are too few, each slice at least MIN_SLICE wide. Depends on M only through the grid."""
    token_tiles = triton.cdiv(M, 128)
    want = max(1, min(triton.cdiv(2 * _triton.multiprocessors(device), token_tiles), triton.cdiv(V, MIN_SLICE)))
    width = triton.cdiv(triton.cdiv(V, want), VOCAB_ALIGN) * VOCAB_ALIGN
    return triton.cdiv(V, width), width


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-slice online log-sum-exp states [S, M] (max, sum of exp(z - max)) -> log-sum-exp [M]."""
    top = m.amax(0)
    top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top_safe + torch.log((s * torch.exp(m - top_safe)).sum(0))


def linear_lse_forward(hidden, weight, bias, labels, inv_temperature: float,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, H], weight [V, H], bias [V] | None, labels [M] (contiguous) in [0, V) -> (token log-probs [M],
    lse [M])."""
    M, H = hidden.shape
    V = weight.shape[0]
    n_slices, width = _slices(M, V, hidden.device)
    part = torch.empty(3, n_slices, M, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_slices)
    _linear_lse_fwd_kernel[grid](hidden, weight, bias, labels, part, M, V, H, hidden.stride(0), hidden.stride(1),
                                 weight.stride(0), weight.stride(1), inv_temperature, softcap or 1.0, width,
                                 m_bucket(M), aligned(hidden, weight), HAS_BIAS=bias is not None,
                                 SOFTCAP=softcap is not None,
                                 **_kernel_flags(hidden, weight, bias))
    lse = merge_lse(part[0], part[1])
    return part[2].sum(0) - lse, lse


def vocab_chunk(M: int, V: int, chunk_size: int | None) -> int:
    """Vocabulary columns per backward chunk: its [M, chunk] gradient tile holds as many elements as chunk_size
    tokens' full logits would (the chunked backends' budget), aligned to VOCAB_ALIGN."""
    budget = (chunk_size or default_chunk_size(V)) * V
    return min(V, max(VOCAB_ALIGN, budget // max(M, 1) // VOCAB_ALIGN * VOCAB_ALIGN))


def linear_backward(grad_token, hidden, weight, bias, labels, lse, inv_temperature: float, chunk_size: int | None,
                    needs_input_grad, softcap: float | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_m grad_token[m] * logp[m] with respect to (hidden, weight, bias), each only if needed."""
    need_h, need_w, need_b = needs_input_grad
    M, H = hidden.shape
    V = weight.shape[0]
    grad_h = torch.zeros(M, H, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.empty(V, dtype=torch.float32, device=bias.device) if need_b else None
    if not (need_h or need_w or need_b):
        return None, None, None
    coef = (grad_token.float() * inv_temperature).contiguous()
    chunk = vocab_chunk(M, V, chunk_size)
    buf = torch.empty(M * chunk, dtype=hidden.dtype, device=hidden.device)
    flags = _kernel_flags(hidden, weight, bias)
    bucket, align = m_bucket(M), aligned(hidden, weight)
    for v0 in range(0, V, chunk):
        n_cols = min(chunk, V - v0)
        g = buf[:M * n_cols].view(M, n_cols)
        grid = lambda meta, n_cols=n_cols: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]),)
        _linear_grad_logits_kernel[grid](hidden, weight, bias, labels, lse, coef, g, M, V, H, v0, n_cols,
                                         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                                         inv_temperature, softcap or 1.0, bucket, align, HAS_BIAS=bias is not None,
                                         SOFTCAP=softcap is not None, GROUP_M=GROUP_M, **flags)
        if need_w:
            torch.mm(g.t(), hidden, out=grad_w[v0:v0 + n_cols])
        if need_b:
            grad_b[v0:v0 + n_cols] = g.sum(0, dtype=torch.float32)
        if need_h:
            accumulate_mm(grad_h, g, weight[v0:v0 + n_cols], slice_bytes=g.nbytes)
    return (None if grad_h is None else grad_h.to(hidden.dtype), grad_w,
            None if grad_b is None else grad_b.to(bias.dtype))


def forward(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None,
            softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear_logprobs backend protocol's forward (chunk_size only shapes the backward)."""
    return linear_lse_forward(hidden, weight, bias, labels, inv_temperature, softcap)


backward = linear_backward  # the linear_logprobs backend protocol's backward
