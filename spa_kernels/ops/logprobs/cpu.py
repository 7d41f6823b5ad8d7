"""C++ CPU kernels for token / sequence log-probs (impl="cpu"); sources in csrc/logprobs/logprobs_cpu.cpp.

Registered as torch.library custom ops so they trace under torch.compile. The kernel checks label ranges itself
(no extra pass) and raises ValueError naming the first bad position.
"""

from __future__ import annotations

import torch

from ... import _ext
from ..._validation import acc_dtype


@torch.library.custom_op("spa_kernels::logprobs_forward_cpu", mutates_args=())
def _forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             inv_temperature: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_ext.kernels().logprobs_forward_cpu(logits, labels, ignore_index, inv_temperature, softcap))


@_forward.register_fake
def _(logits, labels, ignore_index, inv_temperature, softcap=0.0):
    shape = logits.shape[:2]
    dt = acc_dtype(logits.dtype)
    return logits.new_empty(shape, dtype=dt), logits.new_empty(shape, dtype=dt)


@torch.library.custom_op("spa_kernels::logprobs_backward_cpu", mutates_args=())
def _backward(grad_token: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
              ignore_index: int, inv_temperature: float, softcap: float = 0.0) -> torch.Tensor:
    return _ext.kernels().logprobs_backward_cpu(grad_token, logits, labels, lse, ignore_index, inv_temperature,
                                                 softcap=softcap)


@_backward.register_fake
def _(grad_token, logits, labels, lse, ignore_index, inv_temperature, softcap=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("spa_kernels::logprobs_backward_cpu_", mutates_args=("grad_out",))
def _backward_into(grad_token: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int, inv_temperature: float, grad_out: torch.Tensor, softcap: float = 0.0) -> None:
    _ext.kernels().logprobs_backward_cpu(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out,
                                        softcap)


def forward(logits, labels, ignore_index: int, inv_temperature: float, softcap: float = 0.0):
    """-> (token_logprobs [N, T], lse [N, T]) in the accumulation dtype; softcap > 0 caps the scaled logits."""
    return _forward(logits, labels, ignore_index, inv_temperature, softcap)


def backward(grad_token, logits, labels, lse, ignore_index: int, inv_temperature: float, grad_out=None,
             softcap: float = 0.0):
    """-> grad_logits; written into grad_out when given (grad_out may be logits itself: in-place backward)."""
    grad_token = grad_token.to(acc_dtype(logits.dtype)).contiguous()
    if grad_out is None:
        return _backward(grad_token, logits, labels, lse, ignore_index, inv_temperature, softcap)
    _backward_into(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out, softcap)
    return grad_out
