"""linear_sequence_logprobs: per-sequence log-probs straight from hidden states and the lm_head weight, never
building [N, T, V] logits. Backends: reference.py ("torch", checkpointed chunks), cpu.py / cuda.py (chunked
matmul + fused log-prob kernel, chunked.py), triton.py (fused matmul + online log-sum-exp); function.py holds the
autograd.Function the kernel backends share."""

from __future__ import annotations

import torch

from ... import _dispatch
from ..._validation import (
    acc_dtype,
    check_floating,
    check_label_range,
    check_labels,
    check_positive_finite,
    check_temperature,
)
from ..logprobs.reference import reduce_sequence
from . import reference
from .function import LinearTokenLogprobsFunction

__all__ = ["linear_sequence_logprobs", "linear_token_logprobs", "check_linear_inputs", "compact_tokens",
           "scatter_tokens", "empty_selection", "check_softcap"]


def check_linear_inputs(hidden, weight, labels, bias=None, prefix=""):
    """Validates hidden [N, T, H], weight [V, H], bias [V] | None, labels [N, T]; returns labels as int64."""
    check_floating(hidden, f"{prefix}hidden")
    check_floating(weight, f"{prefix}weight")
    if hidden.dim() != 3:
        raise ValueError(f"{prefix}hidden must be [N, T, H], got shape {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{prefix}weight must be [V, H] with H = {hidden.shape[2]} ({prefix}hidden's last dim), "
                         f"got shape {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight has an empty vocabulary dimension (shape {list(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight ({weight.dtype}) and {prefix}hidden ({hidden.dtype}) must share a dtype")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}weight is on {weight.device} but {prefix}hidden is on {hidden.device}")
    if bias is not None:
        check_floating(bias, f"{prefix}bias")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{prefix}bias must be [{weight.shape[0]}] {weight.dtype} on {weight.device}, got "
                             f"{list(bias.shape)} {bias.dtype} on {bias.device}")
    return check_labels(labels, tuple(hidden.shape[:2]), hidden.device, like=f"{prefix}hidden")


def compact_tokens(labels: torch.Tensor, ignore_index: int):
    """Flat indices of the scored tokens: only these reach a matmul (prompt and padding tokens cost nothing)."""
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def scatter_tokens(values: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """[M] values at flat `index` of a zero [N, T] tensor (differentiable)."""
    out = values.new_zeros(shape[0] * shape[1])
    return out.index_put((index,), values).view(shape[0], shape[1])


def empty_selection(hidden, weight, bias, shape) -> torch.Tensor:
    """All tokens ignored: zeros that stay connected to the inputs (backward gives zero gradients, not an error)."""
    out = hidden.new_zeros(shape, dtype=acc_dtype(hidden.dtype))
    if torch.is_grad_enabled():
        for t in (hidden, weight, bias):
            if t is not None and t.requires_grad:
                out = out + t[:0].sum().to(out.dtype)  # an empty sum: exactly 0, gradient zeros
    return out


def check_softcap(softcap: float | None) -> float | None:
    """None (no capping) or a positive finite cap."""
    if softcap is None:
        return None
    return check_positive_finite(softcap, "softcap")


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None, impl: str = "auto",
                          chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log p(label) [N, T] from hidden [N, T, H] and weight [V, H]; ignored positions are 0."""
    labels = check_linear_inputs(hidden, weight, labels, bias)
    temperature = check_temperature(temperature)
    softcap = check_softcap(softcap)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    check_label_range(labels, weight.shape[0], ignore_index)
    name, backend = _dispatch.resolve("linear_logprobs", impl,
                                      {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels})
    N, T, H = hidden.shape
    index = compact_tokens(labels, ignore_index)
    if index.numel() == 0:
        return empty_selection(hidden, weight, bias, (N, T))
    args = (hidden.reshape(N * T, H).index_select(0, index), weight, bias,
            labels.reshape(-1).index_select(0, index).contiguous(), 1.0 / temperature,
            None if chunk_size is None else int(chunk_size), softcap)
    if name == "torch":
        token = reference.linear_token_logprobs(*args)
    else:
        token = LinearTokenLogprobsFunction.apply(*args, backend)
    return scatter_tokens(token, index, (N, T))


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, average: bool = False,
                             temperature: float = 1.0, softcap: float | None = None, impl: str = "auto",
                             chunk_size: int | None = None) -> torch.Tensor:
    """Per-sequence ``sum_t log softmax(hidden_t @ weight.T + bias)[label_t]`` -> [N] float32.

    The logits are ``z = (hidden @ weight.T + bias) / temperature`` and, with ``softcap`` (final-logit
    softcapping, Gemma 2 / 3), ``softcap * tanh(z / softcap)`` before the softmax, in every backend and in the
    backward.
    hidden [N, T, H] (e.g. a model's last hidden states, already aligned with labels), weight [V, H] (the lm_head),
    bias [V] or None, labels [N, T] with ``ignore_index`` for unscored positions. Gradients reach hidden, weight
    and bias. ``chunk_size`` = tokens per chunk for the chunked backends (default: from V; on a GPU at most
    512 MiB and 1/8 of the free memory per chunk of logits, on the CPU ~32 MiB).
    """
    token = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                  temperature=temperature, softcap=softcap, impl=impl, chunk_size=chunk_size)
    return reduce_sequence(token, labels.long(), ignore_index, average)
