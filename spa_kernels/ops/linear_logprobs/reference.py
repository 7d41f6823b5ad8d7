"""Pure-PyTorch reference of log-probs from hidden states (impl="torch"): logits = hidden @ weight.T (+ bias) are
computed one chunk of tokens at a time under activation checkpointing, so forward and backward never hold more
than one chunk of logits. The public function has already dropped ignored tokens."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..._validation import acc_dtype
from ..logprobs import reference as logprobs_ref
from .chunked import default_chunk_size


def _chunk_logprobs(hidden, weight, bias, labels, temperature, softcap=None):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:  # cap * tanh(z / cap) of the scaled logits, in the accumulation dtype
        z = logits.to(acc_dtype(logits.dtype)) / temperature
        logits, temperature = softcap * torch.tanh(z / softcap), 1.0
    return logprobs_ref.token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), -1, temperature).squeeze(0)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, inv_temperature: float, chunk_size: int | None,
                          softcap: float | None = None) -> torch.Tensor:
    """hidden [M, H], weight [V, H], labels [M] all in [0, V) -> [M] log p(label)."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    out = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s:s + chunk], weight, bias, labels[s:s + chunk], 1.0 / inv_temperature, softcap)
        out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return torch.cat(out)
