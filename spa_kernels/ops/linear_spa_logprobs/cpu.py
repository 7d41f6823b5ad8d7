"""SPA triple log-probs from hidden states with the cpu SPA kernel on token chunks (impl="cpu"); see function.py."""

from __future__ import annotations

from . import function


def supports(weight=None, ref_weight=None, **_):
    if weight is not None and ref_weight is not None and weight.dtype != ref_weight.dtype:
        return f"weight ({weight.dtype}) and ref_weight ({ref_weight.dtype}) must share a dtype"
    return None


def linear_spa_token_logprobs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam: float,
                              chunk_size: int | None):
    return function.linear_spa_token_logprobs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lam,
                                              chunk_size, "cpu")
