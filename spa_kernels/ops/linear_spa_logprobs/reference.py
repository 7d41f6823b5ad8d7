"""Pure-PyTorch reference of the SPA triple log-probs from hidden states (impl="torch"): chunks of tokens under
activation checkpointing, policy logits hidden @ weight.T (+ bias), reference logits ref_hidden @ ref_weight.T
(+ ref_bias). Only the policy log-probs carry a gradient."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..linear_logprobs.chunked import default_chunk_size
from ..spa_logprobs import reference as spa_ref


def _chunk(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam):
    logits = torch.nn.functional.linear(hidden, weight, bias).unsqueeze(0)
    with torch.no_grad():
        ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias).unsqueeze(0)
    token, ref, ext = spa_ref.spa_token_logprobs(logits, ref_logits, labels.unsqueeze(0), lam, -1)
    return token[0], ref[0], ext[0]


def linear_spa_token_logprobs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float,
                              chunk_size: int | None):
    """[M, H] hidden / ref_hidden, labels [M] in [0, V) -> (token_logps, ref, extrapolated), each [M]."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        sl = slice(s, s + chunk)
        args = (hidden[sl], weight, bias, ref_hidden[sl], ref_weight, ref_bias, labels[sl], lam)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))
