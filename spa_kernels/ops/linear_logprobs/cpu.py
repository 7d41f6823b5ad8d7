"""Log-probs from hidden states with the cpu log-prob kernel on token chunks (impl="cpu"); see function.py."""

from __future__ import annotations

from . import function


def linear_token_logprobs(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None,
                          softcap: float | None = None):
    return function.linear_token_logprobs(hidden, weight, bias, labels, inv_temperature, chunk_size, "cpu", softcap)
