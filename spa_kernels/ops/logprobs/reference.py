"""Pure-PyTorch reference of token / sequence log-probs (impl="torch"): float32 accumulation (float64 inputs stay
float64), plain autograd. It is the fallback where no kernel applies and the baseline the kernels are tested
against (the tests' ground truth is float64 log_softmax)."""

from __future__ import annotations

import torch

from ..._validation import acc_dtype, check_label_range


class _ScoredLogSumExp(torch.autograd.Function):
    """logsumexp(z, -1) of [N, T, V] z where `mask` [N, T] is set, 0 elsewhere, with the semantics the kernels have:

    - a row holding a +inf logit gives NaN (as torch.log_softmax, whose every entry is NaN there; logsumexp alone
      would give +inf, i.e. a -inf log-prob for the other labels), and a NaN gradient row;
    - an unscored (ignored) row gives 0 and a zero gradient whatever it holds: through autograd's logsumexp a NaN in
      such a row would come back as 0 * NaN = NaN in its gradient.
    The backward's exp(z - lse) buffer is the gradient itself (no more memory than autograd's logsumexp)."""

    @staticmethod
    def forward(ctx, z, mask):
        lse = torch.logsumexp(z, dim=-1)
        lse = torch.where(lse == float("inf"), float("nan"), lse).masked_fill(~mask, 0.0)
        ctx.save_for_backward(z, lse, mask)
        return lse

    @staticmethod
    def backward(ctx, grad):
        z, lse, mask = ctx.saved_tensors
        g = torch.exp(z - lse.unsqueeze(-1))
        g.mul_(grad.unsqueeze(-1)).masked_fill_(~mask.unsqueeze(-1), 0.0)
        return g, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   temperature: float = 1.0) -> torch.Tensor:
    """[N, T, V] logits, [N, T] labels -> [N, T] log p(label); ignored positions are 0 (and get a zero gradient)."""
    check_label_range(labels, logits.shape[-1], ignore_index)
    z = logits.to(acc_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    mask = labels != ignore_index
    picked = z.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    # logsumexp rather than log_softmax: nothing of size [N, T, V] is kept for backward except z itself.
    return (picked - _ScoredLogSumExp.apply(z, mask)).masked_fill(~mask, 0.0)


def reduce_sequence(token: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """Sum (or mean over scored tokens; 0 when none) of [N, T] token log-probs -> [N]."""
    total = token.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1).to(total.dtype)
    return total


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, average: bool = False,
                      temperature: float = 1.0) -> torch.Tensor:
    return reduce_sequence(token_logprobs(logits, labels, ignore_index, temperature), labels, ignore_index, average)
