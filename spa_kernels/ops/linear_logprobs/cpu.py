"""linear_logprobs with impl="cpu": ATen matmuls per chunk of tokens around the C++ log-prob kernel; the chunk loop
is chunked.py."""

from __future__ import annotations

from ..logprobs import cpu as logits_kernels
from . import chunked


def forward(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None, softcap: float | None = None):
    return chunked.forward(logits_kernels, hidden, weight, bias, labels, inv_temperature, chunk_size, softcap)


def backward(grad_token, hidden, weight, bias, labels, lse, inv_temperature: float, chunk_size: int | None,
             needs_input_grad, softcap: float | None = None):
    return chunked.backward(logits_kernels, grad_token, hidden, weight, bias, labels, lse, inv_temperature,
                            chunk_size, needs_input_grad, softcap)
