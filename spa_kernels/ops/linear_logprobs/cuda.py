"""Log-probs from hidden states with the cuda log-prob kernel on token chunks (impl="cuda"); see function.py."""

from __future__ import annotations

from .function import ChunkedLinearLogprobsFunction, default_chunk_size


def linear_token_logprobs(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None):
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return ChunkedLinearLogprobsFunction.apply(hidden, weight, bias, labels, inv_temperature, chunk, "cuda")
