"""autograd.Function for token log-probs over the kernel backend the dispatcher resolved.

A logprobs backend (cpu.py, cuda.py, triton.py beside this file) provides
    forward(logits [N,T,V], labels [N,T], ignore_index, inv_temperature) -> (token_logprobs [N,T], lse [N,T])
    backward(grad_token [N,T], logits, labels, lse, ignore_index, inv_temperature, grad_out=None) -> grad_logits
Only [N, T] vectors are saved besides the logits (which autograd holds anyway); with inplace_backward the gradient
is written into the logits buffer, so the backward allocates nothing of size [N, T, V].
"""

from __future__ import annotations

import torch


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, inv_temperature: float, inplace_backward: bool, backend):
        token, lse = backend.forward(logits, labels, ignore_index, inv_temperature)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, inv_temperature, inplace_backward, backend)
        return token

    @staticmethod
    def backward(ctx, grad_token):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, inv_temperature, inplace_backward, backend = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = inplace_backward_grad(backend, grad_token, logits, labels, lse, ignore_index, inv_temperature,
                                         inplace_backward)
        return grad, None, None, None, None, None


def inplace_backward_grad(kernels, grad_token, logits, labels, lse, ignore_index, inv_temperature, inplace):
    """Runs the backward kernel, into the logits buffer when `inplace`. The version bump makes any later autograd
    use of the overwritten logits fail loudly instead of silently reading gradients."""
    if not inplace:
        return kernels.backward(grad_token, logits, labels, lse, ignore_index, inv_temperature)
    grad = kernels.backward(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out=logits)
    torch.autograd.graph.increment_version(logits)
    # A fresh alias of the buffer: autograd can then adopt it as a leaf's .grad instead of cloning it.
    return grad.detach()
