"""Pure-PyTorch reference of token / sequence log-probs (impl="torch"): float32 accumulation (float64 inputs stay
float64), plain autograd. It is the fallback where no kernel applies and the baseline the kernels are tested
against (the tests' ground truth is float64 log_softmax)."""

from __future__ import annotations

import torch

from ..._validation import acc_dtype, check_label_range


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   temperature: float = 1.0) -> torch.Tensor:
    """[N, T, V] logits, [N, T] labels -> [N, T] log p(label); ignored positions are 0."""
    check_label_range(labels, logits.shape[-1], ignore_index)
    z = logits.to(acc_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    mask = labels != ignore_index
    picked = z.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    # logsumexp rather than log_softmax: nothing of size [N, T, V] is kept for backward except z itself.
    lse = torch.logsumexp(z, dim=-1)
    # torch.log_softmax gives NaN for every entry of a row holding a +inf logit (and a NaN gradient row), where
    # logsumexp gives +inf (a -inf log-prob for the other labels). Multiplying by a NaN constant on those rows gives
    # log_softmax's forward and, through the NaN factor, its NaN gradient row.
    lse = lse * torch.where(lse == float("inf"), float("nan"), 1.0).to(lse.dtype)
    return (picked - lse).masked_fill(~mask, 0.0)


def reduce_sequence(token: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """Sum (or mean over scored tokens; 0 when none) of [N, T] token log-probs -> [N]."""
    total = token.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1).to(total.dtype)
    return total


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, average: bool = False,
                      temperature: float = 1.0) -> torch.Tensor:
    return reduce_sequence(token_logprobs(logits, labels, ignore_index, temperature), labels, ignore_index, average)
