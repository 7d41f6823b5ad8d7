"""FusedLinearPreferenceLoss: from the last hidden states and the lm_head weight straight to a DPO-family loss,
without [batch, seq, vocab] logits. Rows are chosen sequences first, then rejected (as TRL and Liger batch them)."""

from __future__ import annotations

import torch
from torch import nn

from .losses import LOSS_TYPES, PreferenceLossOutput, preference_loss, preference_margins
from .ops.linear_logprobs import linear_sequence_logprobs
from .ops.linear_spa_logprobs import linear_spa_sequence_logprobs


def _split_pairs(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"{name} must stack chosen rows then rejected rows (an even count), got {t.shape[0]} rows")
    return t.chunk(2, dim=0)


class FusedLinearPreferenceLoss(nn.Module):
    """DPO-family loss from hidden states.

    Args:
        beta, loss_type, label_smoothing, refine_alpha, simpo_gamma, reduction: as in preference_loss.
        average_log_prob: divide sequence log-probs by their token count (default: True for ipo and simpo, as
            TRL does, False otherwise).
        lam: SPA's extrapolation coefficient for de-coupled noise detection (loss_type="spa"); needs ref_hidden.
        noise_threshold: with lam, a pair is noisy when beta * h_extrapolated <= noise_threshold (SPA compares with
            a running percentile: spa.refine keeps it and passes it here, or passes `noisy` directly).
        ignore_index, temperature, softcap, impl, chunk_size: as in linear_sequence_logprobs (softcap: final-logit
            softcapping; not with lam).

    forward(hidden [2B, T, H], weight [V, H], labels [2B, T], bias=None, *, ref_logps=None | [2B] | (chosen, rejected),
            ref_hidden=None, ref_weight=None, ref_bias=None, noisy=None, margin=None, lam=None,
            noise_threshold=None) -> PreferenceLossOutput (with chosen/rejected log-probs; for spa + lam also the
            extrapolated margins and the noisy mask used).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, average_log_prob: bool | None = None, temperature: float = 1.0,
                 refine_alpha: float = 0.1, simpo_gamma: float = 0.5, lam: float | None = None,
                 noise_threshold: float | None = None, reduction: str = "mean", impl: str = "auto",
                 chunk_size: int | None = None, softcap: float | None = None):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
        if lam is not None and loss_type != "spa":
            raise ValueError(f"lam (extrapolated noise detection) needs loss_type='spa', got {loss_type!r}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.average_log_prob = loss_type in ("ipo", "simpo") if average_log_prob is None else average_log_prob
        self.refine_alpha, self.simpo_gamma, self.reduction = refine_alpha, simpo_gamma, reduction
        self.lam, self.noise_threshold, self.impl, self.chunk_size = lam, noise_threshold, impl, chunk_size

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, average_log_prob={self.average_log_prob}, "
                f"lam={self.lam}, impl={self.impl!r}")

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None, *, ref_logps=None, ref_hidden: torch.Tensor | None = None,
                ref_weight: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                noisy: torch.Tensor | None = None, margin: torch.Tensor | None = None, lam: float | None = None,
                noise_threshold: float | None = None) -> PreferenceLossOutput:
        lam = self.lam if lam is None else lam
        noise_threshold = self.noise_threshold if noise_threshold is None else noise_threshold
        common = dict(ignore_index=self.ignore_index, average=self.average_log_prob, impl=self.impl,
                      chunk_size=self.chunk_size)
        needs_ref = self.loss_type != "simpo"
        if needs_ref and ref_logps is None and ref_hidden is None:
            raise ValueError(f"loss_type={self.loss_type!r} needs the reference: pass ref_logps ([2B] or a "
                             "(chosen, rejected) pair) or ref_hidden and ref_weight")
        if ref_hidden is not None and ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight (the reference model's lm_head weight)")
        if ref_hidden is not None and ref_logps is not None:
            raise ValueError("pass either ref_logps or ref_hidden/ref_weight, not both")

        extrapolated = None
        if lam is not None:
            if self.loss_type != "spa" or ref_hidden is None:
                raise ValueError("lam (extrapolated noise detection) needs loss_type='spa' and ref_hidden/ref_weight")
            if self.temperature != 1.0 or self.softcap is not None:
                raise ValueError("lam with temperature != 1 or softcap is not supported")
            logps, ref, ext = linear_spa_sequence_logprobs(hidden, weight, ref_hidden, ref_weight, labels, lam=lam,
                                                           bias=bias, ref_bias=ref_bias, **common)
            ext_c, ext_r = _split_pairs(ext, "hidden")
        else:
            logps = linear_sequence_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                             softcap=self.softcap, **common)
            ref = None
            if needs_ref and ref_hidden is not None:
                with torch.no_grad():
                    ref = linear_sequence_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias,
                                                   temperature=self.temperature, softcap=self.softcap, **common)
        chosen, rejected = _split_pairs(logps, "hidden")

        if ref is not None:
            ref_c, ref_r = _split_pairs(ref, "hidden")
        elif ref_logps is not None and needs_ref:
            if isinstance(ref_logps, (tuple, list)):
                ref_c, ref_r = ref_logps
            else:
                if ref_logps.shape != logps.shape:
                    raise ValueError(f"ref_logps must be [{logps.shape[0]}] (chosen then rejected), got "
                                     f"{list(ref_logps.shape)}")
                ref_c, ref_r = _split_pairs(ref_logps, "ref_logps")
        else:
            ref_c = ref_r = None

        if lam is not None:
            extrapolated = preference_margins(ext_c, ext_r, ref_c, ref_r, self.beta)
            if noisy is None:
                if noise_threshold is None:
                    raise ValueError("loss_type='spa' with lam needs `noisy` or `noise_threshold`")
                noisy = extrapolated <= noise_threshold
        if self.loss_type == "spa" and noisy is None:
            raise ValueError("loss_type='spa' needs the noisy-pair mask (`noisy`) or lam with `noise_threshold`")

        out = preference_loss(chosen, rejected, ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
                              label_smoothing=self.label_smoothing, margin=margin,
                              noisy=noisy, refine_alpha=self.refine_alpha,
                              simpo_gamma=self.simpo_gamma, reduction=self.reduction)
        return PreferenceLossOutput(loss=out.loss, losses=out.losses, chosen_rewards=out.chosen_rewards,
                                    rejected_rewards=out.rejected_rewards, chosen_logps=chosen.detach(),
                                    rejected_logps=rejected.detach(),
                                    extrapolated_margins=None if extrapolated is None else extrapolated.detach(),
                                    noisy=out.noisy)
