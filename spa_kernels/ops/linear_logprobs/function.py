"""autograd.Function for log-probs from hidden states over the kernel backend the dispatcher resolved.

A linear_logprobs backend (cpu.py, cuda.py, triton.py beside this file) provides
    forward(hidden [M,H], weight [V,H], bias [V] | None, labels [M], inv_temperature, chunk_size, softcap)
        -> (token_logprobs [M], lse [M])
    backward(grad_token [M], hidden, weight, bias, labels, lse, inv_temperature, chunk_size, needs_input_grad,
             softcap) -> (grad_hidden, grad_weight, grad_bias)
Only the per-token log-sum-exp is saved besides the inputs; the backward recomputes logits chunk by chunk.
"""

from __future__ import annotations

import torch


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None,
                softcap: float | None, backend):
        token, lse = backend.forward(hidden, weight, bias, labels, inv_temperature, chunk_size, softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (inv_temperature, chunk_size, softcap, backend)
        return token

    @staticmethod
    def backward(ctx, grad_token):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        inv_temperature, chunk_size, softcap, backend = ctx.args
        grads = backend.backward(grad_token, hidden, weight, bias, labels, lse, inv_temperature, chunk_size,
                                 ctx.needs_input_grad[:3], softcap)
        return (*grads, None, None, None, None, None)
