"""autograd.Function for the SPA triple log-probs from hidden states over the kernel backend the dispatcher
resolved.

A linear_spa_logprobs backend (cpu.py, cuda.py, triton.py beside this file) provides
    forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam, chunk_size)
        -> (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [M]
    backward: linear_logprobs' backward (the policy log-probs' gradient, temperature 1).
Only token_logps carries a gradient (to hidden, weight, bias).
"""

from __future__ import annotations

import torch


class LinearSpaTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float,
                chunk_size: int | None, backend):
        token, lse, ref, ext = backend.forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam,
                                               chunk_size)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (chunk_size, backend)
        ctx.mark_non_differentiable(ref, ext)
        return token, ref, ext

    @staticmethod
    def backward(ctx, grad_token, _grad_ref, _grad_ext):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk_size, backend = ctx.args
        grads = backend.backward(grad_token, hidden, weight, bias, labels, lse, 1.0, chunk_size,
                                 ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None, None)
