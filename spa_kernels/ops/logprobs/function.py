"""autograd.Function over a kernel backend's (forward, backward) pair for token log-probs.

A backend module (cpu.py, cuda.py, triton.py) provides
    forward(logits [N,T,V], labels [N,T], ignore_index, inv_temperature) -> (token_logprobs [N,T], lse [N,T])
    backward(grad_token [N,T], logits, labels, lse, ignore_index, inv_temperature, grad_out=None) -> grad_logits
Only [N, T] vectors are saved besides the logits (which autograd holds anyway); with inplace_backward the gradient
is written into the logits buffer, so the backward allocates nothing of size [N, T, V].
"""

from __future__ import annotations

import importlib

import torch


def backend(op: str, impl: str):
    return importlib.import_module(f"spa_kernels.ops.{op}.{impl}")


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, inv_temperature: float, inplace_backward: bool, impl: str):
        kernels = backend("logprobs", impl)
        token, lse = kernels.forward(logits, labels, ignore_index, inv_temperature)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, inv_temperature, inplace_backward, impl)
        return token

    @staticmethod
    def backward(ctx, grad_token):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, inv_temperature, inplace_backward, impl = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = inplace_backward_grad(backend("logprobs", impl), grad_token, logits, labels, lse, ignore_index,
                                         inv_temperature, inplace_backward)
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
