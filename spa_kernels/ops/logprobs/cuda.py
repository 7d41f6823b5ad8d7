"""CUDA kernels for token / sequence log-probs (impl="cuda"); sources in csrc/logprobs/logprobs_cuda.cu.

The kernel never reads out of bounds for a bad label: it records the first bad row in a device flag, which is
checked here (a host sync per forward; pass validate=False through the public API to skip it).
"""

from __future__ import annotations

import torch

from ... import _ext


def _raise_bad_label(labels: torch.Tensor, flat: int, vocab: int, ignore_index: int) -> None:
    n, t = divmod(flat, labels.shape[1])
    raise ValueError(f"labels[{n}, {t}] = {int(labels[n, t])} is outside [0, {vocab}) and is not ignore_index "
                     f"({ignore_index})")


def forward(logits, labels, ignore_index: int, inv_temperature: float, validate: bool = True):
    token, lse, bad = _ext.kernels().logprobs_forward_cuda(logits, labels, ignore_index, inv_temperature)
    if validate:
        flat = int(bad.item())
        if flat != torch.iinfo(torch.int64).max:
            _raise_bad_label(labels, flat, logits.shape[-1], ignore_index)
    return token, lse


def backward(grad_token, logits, labels, lse, ignore_index: int, inv_temperature: float, grad_out=None):
    grad_token = grad_token.float().contiguous()
    return _ext.kernels().logprobs_backward_cuda(grad_token, logits, labels, lse, ignore_index, inv_temperature,
                                                 grad_out)
