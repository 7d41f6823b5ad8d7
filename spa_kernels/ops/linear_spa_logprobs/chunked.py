"""Chunked SPA triple log-probs from hidden states over an spa_logprobs kernel backend: the forward of the cpu and
cuda linear_spa_logprobs backends (cpu.py / cuda.py bind it to their SPA kernels).

Per chunk of tokens, policy and reference logits by ATen matmul into two reusable [chunk, V] buffers, then the
backend's one-pass SPA kernel (peak extra memory: two chunks of logits, which share one chunk's budget). The
backward is linear_logprobs' (only the policy logits carry a gradient).
"""

from __future__ import annotations

from ..._validation import acc_dtype, label_check
from ..linear_logprobs.chunked import _NO_IGNORE, chunk_logits_into, chunk_size_for


def over(kernels):
    """The forward of the linear_spa_logprobs backend protocol on `kernels` (an spa_logprobs backend)."""

    def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float, chunk_size: int | None):
        return chunked_forward(kernels, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam,
                               chunk_size)

    return forward


def chunked_forward(kernels, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float,
            chunk_size: int | None):
    """-> (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [M]."""
    M = hidden.shape[0]
    chunk = chunk_size or max(1, chunk_size_for(M, weight.shape[0], weight.dtype, weight.device) // 2)
    dt = acc_dtype(hidden.dtype)
    token, lse, ref, ext = (hidden.new_empty(M, dtype=dt) for _ in range(4))
    buf = hidden.new_empty(min(chunk, M), weight.shape[0])
    ref_buf = ref_hidden.new_empty(min(chunk, M), ref_weight.shape[0])
    with label_check("trusted"):  # the public function has checked every label
        for s in range(0, M, chunk):
            sl = slice(s, s + chunk)
            m = hidden[sl].shape[0]
            z = chunk_logits_into(buf[:m], hidden[sl], weight, bias).unsqueeze(0)
            zr = chunk_logits_into(ref_buf[:m], ref_hidden[sl], ref_weight, ref_bias).unsqueeze(0)
            t, lse_c, r, e = kernels.forward(z, zr, labels[sl].unsqueeze(0), _NO_IGNORE, lam)
            token[sl], lse[sl], ref[sl], ext[sl] = t[0], lse_c[0], r[0], e[0]
    return token, lse, ref, ext
