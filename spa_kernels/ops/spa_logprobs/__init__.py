"""spa_sequence_logprobs: policy, reference and extrapolated (DND) log-probs per sequence from one pass over the
policy and reference logits. Backends: reference.py ("torch"), cpu.py, cuda.py, triton.py; function.py holds the
autograd.Function the kernel backends share."""

from __future__ import annotations

import torch

from ... import _dispatch
from ..._validation import (
    check_finite,
    check_floating,
    check_logits_and_labels,
    label_check,
    label_check_for,
    use_inplace_backward,
    vocab_contiguous,
)
from ..logprobs.reference import reduce_sequence
from . import reference
from .function import SpaTokenLogprobsFunction

__all__ = ["spa_sequence_logprobs"]


def spa_sequence_logprobs(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *, lam: float,
                          ignore_index: int = -100, average: bool = False, impl: str = "auto",
                          inplace_backward: bool = False,
                          validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logps, ref_logps, extrapolated_logps), each [N] float32.

    extrapolated = sum_t log_softmax((1 + lam) * logits - lam * ref_logits)[label_t], SPA's de-coupled noise
    detection. Gradient flows to ``logits`` via ``logps`` only; ``ref_logits`` never receives one.
    logits / ref_logits: [N, T, V] of the same shape; labels [N, T] (ignore_index positions contribute 0).
    validate: as in token_logprobs (validate=False lets impl="cuda" skip the host wait of the label check).
    """
    labels = check_logits_and_labels(logits, labels)
    check_floating(ref_logits, "ref_logits")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have logits' shape {list(logits.shape)}, got {list(ref_logits.shape)}")
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits is on {ref_logits.device} but logits is on {logits.device}")
    lam = check_finite(lam, "lam")
    inplace = use_inplace_backward(logits, inplace_backward)
    name, backend = _dispatch.resolve("spa_logprobs", impl,
                                      {"logits": logits, "ref_logits": ref_logits, "labels": labels})
    if name == "torch":
        return reference.spa_sequence_logprobs(logits, ref_logits, labels, lam, ignore_index, average)
    with label_check(label_check_for(validate)):
        tokens = SpaTokenLogprobsFunction.apply(vocab_contiguous(logits), vocab_contiguous(ref_logits.detach()),
                                                labels, int(ignore_index), lam, inplace, backend)
    return tuple(reduce_sequence(t, labels, ignore_index, average) for t in tokens)
