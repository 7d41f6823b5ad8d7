"""Chunked SPA triple log-probs from hidden states over a kernel backend (cpu / cuda paths).

Forward: per chunk of tokens, policy and reference logits by ATen matmul into two reusable [chunk, V] buffers, then
the backend's one-pass SPA kernel (peak extra memory: two chunks of logits). Backward: identical to
linear_logprobs' (only the policy logits carry a gradient), so it is reused.
"""

from __future__ import annotations

import torch

from ..._validation import acc_dtype, label_check
from ..linear_logprobs.function import _NO_IGNORE, chunk_logits_into, chunk_size_for, chunked_linear_backward
from ..logprobs.function import backend


def linear_spa_token_logprobs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float,
                              chunk_size: int | None, impl: str):
    """The chunked path for a backend ("cpu" / "cuda"); the two logits buffers share the budget of one chunk."""
    chunk = chunk_size or max(1, chunk_size_for(hidden.shape[0], weight.shape[0], weight.dtype, weight.device) // 2)
    return ChunkedLinearSpaLogprobsFunction.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                                                  lam, chunk, impl)


class ChunkedLinearSpaLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float, chunk: int,
                impl: str):
        kernels = backend("spa_logprobs", impl)
        M = hidden.shape[0]
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
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (chunk, impl)
        ctx.mark_non_differentiable(ref, ext)
        return token, ref, ext

    @staticmethod
    def backward(ctx, grad_token, _grad_ref, _grad_ext):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk, impl = ctx.args
        grads = chunked_linear_backward(backend("spa_logprobs", impl), grad_token, hidden, weight, bias, labels, lse,
                                        1.0, chunk, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None, None)
