"""token_logprobs / sequence_logprobs: log p(label) per token from logits, summed (or averaged) per sequence.

Backends: reference.py ("torch"), cpu.py (C++), cuda.py (CUDA C++), triton.py; function.py holds the
autograd.Function the kernel backends share.
"""

from __future__ import annotations

import torch

from ... import _dispatch
from ..._validation import (
    check_logits_and_labels,
    check_temperature,
    label_check,
    label_check_for,
    use_inplace_backward,
    vocab_contiguous,
)
from . import reference
from .function import TokenLogprobsFunction

__all__ = ["token_logprobs", "sequence_logprobs"]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, impl: str = "auto", inplace_backward: bool = False,
                   validate: bool = True) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(logits / temperature)[label]``.

    Args:
        logits: [N, T, V] (or [M, V]) float32 / bfloat16 / float16 / float64. Label t is scored by position t:
            shift before calling. Any strides over N and T are read in place.
        labels: [N, T] (or [M]) integer; ``ignore_index`` positions give 0. Others must lie in [0, V).
        impl: "auto" | "torch" | "cpu" | "triton" | "cuda".
        inplace_backward: kernel backends write the gradient into the logits buffer (no [N, T, V] allocation);
            the logits must not be used after backward. Ignored by impl="torch".
        validate: a label outside [0, V) that is not ``ignore_index`` raises ValueError naming its position. With
            impl="cuda" the kernel flags it on the device (it is never read) and validate=True reads that flag
            before returning, which makes the host wait for the kernel. validate=False removes that wait: the
            token is scored as ignored (0, zero gradient) and the ValueError is raised by a later spa_kernels CUDA
            call once the GPU has finished this one, or by ``spa_kernels.flush_label_checks()``. The other
            implementations always raise in the call.

    Returns:
        [N, T] (or [M]) float32 (float64 for float64 logits).
    """
    if logits.dim() == 2 and labels.dim() == 1:
        return token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), ignore_index=ignore_index,
                              temperature=temperature, impl=impl, inplace_backward=inplace_backward,
                              validate=validate).squeeze(0)
    labels = check_logits_and_labels(logits, labels)
    temperature = check_temperature(temperature)
    inplace = use_inplace_backward(logits, inplace_backward)
    name, backend = _dispatch.resolve("logprobs", impl, {"logits": logits, "labels": labels})
    if name == "torch":
        return reference.token_logprobs(logits, labels, ignore_index, temperature)
    with label_check(label_check_for(validate)):
        return TokenLogprobsFunction.apply(vocab_contiguous(logits), labels, int(ignore_index), 1.0 / temperature,
                                          inplace, backend)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, average: bool = False,
                      temperature: float = 1.0, impl: str = "auto", inplace_backward: bool = False,
                      validate: bool = True) -> torch.Tensor:
    """Per-sequence ``sum_t log p(label_t)`` over non-ignored tokens ([N, T, V] logits, [N, T] labels -> [N]).

    ``average=True`` divides by the number of scored tokens (a row with none gives 0). Float32 accumulation
    whatever the input dtype. See token_logprobs for the other arguments.
    """
    labels = check_logits_and_labels(logits, labels)
    token = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, impl=impl,
                           inplace_backward=inplace_backward, validate=validate)
    return reference.reduce_sequence(token, labels, ignore_index, average)
