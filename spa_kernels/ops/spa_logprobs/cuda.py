"""CUDA kernel for the SPA triple log-probs (impl="cuda"); source in csrc/spa_logprobs/spa_logprobs_cuda.cu.
The backward is the log-prob backward of the policy logits (logprobs/cuda.py) with temperature 1; label flags are
handled as in logprobs/cuda.py."""

from __future__ import annotations

import torch

from ... import _ext
from ..._validation import check_label_flag, raise_deferred_label_errors
from ..logprobs.cuda import backward  # noqa: F401 - the backward this op uses


@torch.library.custom_op("spa_kernels::spa_logprobs_forward_cuda", mutates_args=())
def _forward(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_ext.kernels().spa_logprobs_forward_cuda(logits, ref_logits, labels, ignore_index, lam))


@_forward.register_fake
def _(logits, ref_logits, labels, ignore_index, lam):
    outs = tuple(logits.new_empty(logits.shape[:2], dtype=torch.float32) for _ in range(4))
    return (*outs, logits.new_empty(1, dtype=torch.int64))


def forward(logits, ref_logits, labels, ignore_index: int, lam: float):
    """-> (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [N, T] float32."""
    raise_deferred_label_errors()
    token, lse, ref, ext, flag = _forward(logits, ref_logits, labels, ignore_index, lam)
    check_label_flag(flag, labels, logits.shape[-1], ignore_index)
    return token, lse, ref, ext
