"""Chunked log-probs from hidden states over a log-prob kernel backend (used by the cpu and cuda paths).

Forward: per chunk of tokens, logits = hidden_c @ weight.T (+ bias) (ATen matmul) -> the backend's fused log-prob
forward; only the per-token log-sum-exp is kept. Backward: per chunk, recompute the logits, let the backend's
backward overwrite them with their gradient in place, then grad_hidden_c = G @ W and grad_weight += G.T @ h_c
(float32 accumulator for reduced dtypes). Peak extra memory: one chunk of logits (+ one [V, H] product for
bf16/fp16 weights).
"""

from __future__ import annotations

import torch

from ..._validation import acc_dtype
from ..logprobs.function import backend

_NO_IGNORE = -1  # tokens reaching this function are all scored (labels in [0, V)); -1 never matches one
CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk; large enough to keep the matmuls efficient


def default_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def chunk_logits(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)


def chunked_linear_forward(kernels, hidden, weight, bias, labels, inv_temperature, chunk):
    M = hidden.shape[0]
    dt = acc_dtype(hidden.dtype)
    token = hidden.new_empty(M, dtype=dt)
    lse = hidden.new_empty(M, dtype=dt)
    for s in range(0, M, chunk):
        z = chunk_logits(hidden[s:s + chunk], weight, bias).unsqueeze(0)
        t, l = kernels.forward(z, labels[s:s + chunk].unsqueeze(0), _NO_IGNORE, inv_temperature)
        token[s:s + chunk] = t[0]
        lse[s:s + chunk] = l[0]
    return token, lse


def chunked_linear_backward(kernels, grad_token, hidden, weight, bias, labels, lse, inv_temperature, chunk,
                            needs_input_grad):
    need_h, need_w, need_b = needs_input_grad
    reduced = weight.dtype in (torch.bfloat16, torch.float16)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32 if reduced else weight.dtype,
                         device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk]
        z = chunk_logits(h, weight, bias).unsqueeze(0)
        g = kernels.backward(grad_token[s:s + chunk].unsqueeze(0), z, labels[s:s + chunk].unsqueeze(0),
                             lse[s:s + chunk].unsqueeze(0), _NO_IGNORE, inv_temperature, grad_out=z)[0]
        if need_h:
            torch.mm(g, weight, out=grad_h[s:s + chunk])
        if need_w:
            if reduced:
                grad_w.add_(torch.mm(g.t(), h))
            else:
                grad_w.addmm_(g.t(), h)
        if need_b:
            grad_b.add_(g.sum(0, dtype=torch.float32))
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature: float, chunk: int, impl: str):
        kernels = backend("logprobs", impl)
        token, lse = chunked_linear_forward(kernels, hidden, weight, bias, labels, inv_temperature, chunk)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (inv_temperature, chunk, impl)
        return token

    @staticmethod
    def backward(ctx, grad_token):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        inv_temperature, chunk, impl = ctx.args
        grads = chunked_linear_backward(backend("logprobs", impl), grad_token, hidden, weight, bias, labels, lse,
                                        inv_temperature, chunk, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)
