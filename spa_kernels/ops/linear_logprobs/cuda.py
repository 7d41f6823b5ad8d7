"""Log-probs from hidden states with the cuda log-prob kernel on token chunks (impl="cuda"); see function.py. The
chunk length comes from V and the GPU's free memory."""

from __future__ import annotations

from . import function


def linear_token_logprobs(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None,
                          softcap: float | None = None):
    return function.linear_token_logprobs(hidden, weight, bias, labels, inv_temperature, chunk_size, "cuda", softcap)
