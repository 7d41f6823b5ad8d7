"""C++ CPU kernel for the SPA triple log-probs (impl="cpu"); source in csrc/spa_logprobs/spa_logprobs_cpu.cpp.
The backward is the log-prob backward of the policy logits (logprobs/cpu.py) with temperature 1."""

from __future__ import annotations

import torch

from ... import _ext
from ..._validation import acc_dtype
from ..logprobs.cpu import backward  # noqa: F401 - the backward this op uses


@torch.library.custom_op("spa_kernels::spa_logprobs_forward_cpu", mutates_args=())
def _forward(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_ext.kernels().spa_logprobs_forward_cpu(logits, ref_logits, labels, ignore_index, lam))


@_forward.register_fake
def _(logits, ref_logits, labels, ignore_index, lam):
    dt = acc_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[:2], dtype=dt) for _ in range(4))


def forward(logits, ref_logits, labels, ignore_index: int, lam: float):
    """-> (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [N, T]."""
    return _forward(logits, ref_logits, labels, ignore_index, lam)
