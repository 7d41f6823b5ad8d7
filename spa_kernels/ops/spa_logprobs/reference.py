"""Pure-PyTorch reference of the SPA triple log-probs (impl="torch").

Per sequence: log pi(y|x), log pi_ref(y|x) and the de-coupled noise detection log-prob computed with the
extrapolated logits (1 + lam) * z - lam * z_ref (token level, then summed). Only log pi carries a gradient.
"""

from __future__ import annotations

import torch

from ..._validation import acc_dtype
from ..logprobs import reference as logprobs_ref


def extrapolate_logits(logits: torch.Tensor, ref_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 + lam) z - lam z_ref in the accumulation dtype; a token the policy rules out (z = -inf) stays -inf, also
    where the reference rules it out too (padded vocabulary), instead of NaN."""
    dt = acc_dtype(logits.dtype)
    z, zr = logits.to(dt), ref_logits.to(dt)
    ext = (1.0 + lam) * z - lam * zr
    return torch.where(z == float("-inf"), z, ext)


def spa_token_logprobs(logits, ref_logits, labels, lam: float, ignore_index: int = -100):
    """-> (token_logps, token_ref_logps, token_extrapolated_logps), each [N, T]."""
    token = logprobs_ref.token_logprobs(logits, labels, ignore_index)
    with torch.no_grad():
        ref = logprobs_ref.token_logprobs(ref_logits, labels, ignore_index)
        ext = logprobs_ref.token_logprobs(extrapolate_logits(logits, ref_logits, lam), labels, ignore_index)
    return token, ref, ext


def spa_sequence_logprobs(logits, ref_logits, labels, lam: float, ignore_index: int = -100, average: bool = False):
    return tuple(logprobs_ref.reduce_sequence(t, labels, ignore_index, average)
                 for t in spa_token_logprobs(logits, ref_logits, labels, lam, ignore_index))
