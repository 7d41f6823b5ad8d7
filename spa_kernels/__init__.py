"""spa_kernels: fused per-sequence log-prob kernels and DPO-family losses.

    import spa_kernels as sk
    logps = sk.sequence_logprobs(logits, labels)                          # [N] float32, no [N,T,V] log-softmax
    logps = sk.linear_sequence_logprobs(hidden, lm_head.weight, labels)   # from hidden states, no logits at all
    out = sk.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")

Every op takes impl="auto" | "torch" | "cpu" | "triton" | "cuda"; SPA_KERNELS_IMPL=<name> replaces "auto".
`python -m spa_kernels.info` reports what is built and usable here.
"""

from ._dispatch import available_impls
from ._validation import flush_label_checks
from .losses import LOSS_TYPES, PreferenceLossOutput, dlma_margin, preference_loss, preference_margins
from .nn import FusedLinearPreferenceLoss
from .ops.linear_logprobs import linear_sequence_logprobs, linear_token_logprobs
from .ops.linear_spa_logprobs import linear_spa_sequence_logprobs
from .ops.logprobs import sequence_logprobs, token_logprobs
from .ops.spa_logprobs import spa_sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "FusedLinearPreferenceLoss",
    "LOSS_TYPES",
    "PreferenceLossOutput",
    "available_impls",
    "dlma_margin",
    "flush_label_checks",
    "linear_sequence_logprobs",
    "linear_spa_sequence_logprobs",
    "linear_token_logprobs",
    "preference_loss",
    "preference_margins",
    "sequence_logprobs",
    "spa_sequence_logprobs",
    "token_logprobs",
]
