"""CUDA kernels for token / sequence log-probs (impl="cuda"); sources in csrc/logprobs/logprobs_cuda.cu.

Registered as torch.library custom ops so they trace under torch.compile; they launch on the current CUDA stream and
never synchronise with the host themselves. A label outside [0, V) is never read: the kernel scores it as ignored
and records the first one in a device flag, which _validation.check_label_flag reads now (validate=True, the default)
or later without blocking (validate=False); see spa_kernels/_validation.py.
"""

from __future__ import annotations

import torch

from ... import _ext
from ..._validation import check_label_flag, raise_deferred_label_errors


@torch.library.custom_op("spa_kernels::logprobs_forward_cuda", mutates_args=())
def _forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             inv_temperature: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_ext.kernels().logprobs_forward_cuda(logits, labels, ignore_index, inv_temperature, softcap))


@_forward.register_fake
def _(logits, labels, ignore_index, inv_temperature, softcap=0.0):
    shape = logits.shape[:2]
    return (logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("spa_kernels::logprobs_backward_cuda", mutates_args=())
def _backward(grad_token: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
              ignore_index: int, inv_temperature: float, softcap: float = 0.0) -> torch.Tensor:
    return _ext.kernels().logprobs_backward_cuda(grad_token, logits, labels, lse, ignore_index, inv_temperature,
                                                 softcap=softcap)


@_backward.register_fake
def _(grad_token, logits, labels, lse, ignore_index, inv_temperature, softcap=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("spa_kernels::logprobs_backward_cuda_", mutates_args=("grad_out",))
def _backward_into(grad_token: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int, inv_temperature: float, grad_out: torch.Tensor, softcap: float = 0.0) -> None:
    _ext.kernels().logprobs_backward_cuda(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out,
                                        softcap)


def forward(logits, labels, ignore_index: int, inv_temperature: float, softcap: float = 0.0):
    """-> (token_logprobs [N, T], lse [N, T]) float32; softcap > 0 caps the scaled logits."""
    raise_deferred_label_errors()
    token, lse, flag = _forward(logits, labels, ignore_index, inv_temperature, softcap)
    check_label_flag(flag, labels, logits.shape[-1], ignore_index)
    return token, lse


def backward(grad_token, logits, labels, lse, ignore_index: int, inv_temperature: float, grad_out=None,
             softcap: float = 0.0):
    """-> grad_logits; written into grad_out when given (grad_out may be logits itself: in-place backward)."""
    raise_deferred_label_errors()
    grad_token = grad_token.float().contiguous()
    if grad_out is None:
        return _backward(grad_token, logits, labels, lse, ignore_index, inv_temperature, softcap)
    _backward_into(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out, softcap)
    return grad_out
