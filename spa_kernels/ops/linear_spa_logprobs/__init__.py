"""linear_spa_sequence_logprobs: the SPA triple (policy, reference, extrapolated log-probs) straight from the
policy's and the reference model's hidden states, never building [N, T, V] logits. Backends: reference.py
("torch"), cpu.py / cuda.py (chunked, chunked.py), triton.py (fused); function.py holds the autograd.Function the
kernel backends share."""

from __future__ import annotations

import torch

from ... import _dispatch
from ..._validation import check_finite, check_label_range
from ..linear_logprobs import check_linear_inputs, compact_tokens, empty_selection, scatter_tokens
from ..logprobs.reference import reduce_sequence
from . import reference
from .function import LinearSpaTokenLogprobsFunction

__all__ = ["linear_spa_sequence_logprobs"]


def linear_spa_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                                 ref_weight: torch.Tensor, labels: torch.Tensor, *, lam: float,
                                 bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                                 ignore_index: int = -100, average: bool = False, impl: str = "auto",
                                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logps, ref_logps, extrapolated_logps), each [N] float32, where per token
    logits = hidden @ weight.T (+ bias), ref_logits = ref_hidden @ ref_weight.T (+ ref_bias) and the extrapolated
    log-prob uses log_softmax((1 + lam) * logits - lam * ref_logits). Gradient reaches hidden / weight / bias via
    logps only. ref_hidden must match hidden's [N, T] and ref_weight weight's vocabulary size."""
    labels = check_linear_inputs(hidden, weight, labels, bias)
    check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, prefix="ref_")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has vocabulary size {ref_weight.shape[0]} but weight has {weight.shape[0]}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    lam = check_finite(lam, "lam")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    check_label_range(labels, weight.shape[0], ignore_index)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "ref_hidden": ref_hidden, "ref_weight": ref_weight,
               "ref_bias": ref_bias, "labels": labels}
    name, backend = _dispatch.resolve("linear_spa_logprobs", impl, tensors)
    N, T, H = hidden.shape
    index = compact_tokens(labels, ignore_index)
    if index.numel() == 0:
        zeros = empty_selection(hidden, weight, bias, (N, T))
        return tuple(reduce_sequence(z, labels, ignore_index, average) for z in (zeros, zeros.detach(), zeros.detach()))
    flat = lambda t: t.reshape(N * T, t.shape[-1]).index_select(0, index)
    args = (flat(hidden), weight, bias, flat(ref_hidden.detach()), ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach(), labels.reshape(-1).index_select(0, index).contiguous(),
            lam, None if chunk_size is None else int(chunk_size))
    if name == "torch":
        tokens = reference.linear_spa_token_logprobs(*args)
    else:
        tokens = LinearSpaTokenLogprobsFunction.apply(*args, backend)
    return tuple(reduce_sequence(scatter_tokens(t, index, (N, T)), labels, ignore_index, average) for t in tokens)
