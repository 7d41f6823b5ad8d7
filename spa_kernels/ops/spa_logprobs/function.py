"""autograd.Function for the SPA triple log-probs over the kernel backend the dispatcher resolved.

An spa_logprobs backend (cpu.py, cuda.py, triton.py beside this file) provides
    forward(logits, ref_logits, labels, ignore_index, lam) -> (token_logps, lse, token_ref_logps, token_ext_logps)
    backward(...) with the log-prob backward's signature (the policy logits' gradient, temperature 1).
Gradient flows to the policy logits through token_logps only.
"""

from __future__ import annotations

import torch

from ..logprobs.function import inplace_backward_grad


class SpaTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, labels, ignore_index: int, lam: float, inplace_backward: bool, backend):
        token, lse, ref, ext = backend.forward(logits, ref_logits, labels, ignore_index, lam)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, inplace_backward, backend)
        ctx.mark_non_differentiable(ref, ext)
        return token, ref, ext

    @staticmethod
    def backward(ctx, grad_token, _grad_ref, _grad_ext):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, inplace_backward, backend = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = inplace_backward_grad(backend, grad_token, logits, labels, lse, ignore_index, 1.0,
                                         inplace_backward)
        return grad, None, None, None, None, None, None
