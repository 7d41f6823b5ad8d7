"""FusedLinearPreferenceLoss: from the last hidden states and the lm_head weight straight to a DPO-family loss,
without [batch, seq, vocab] logits. Rows are chosen sequences first, then rejected (as TRL and Liger batch them)."""

from __future__ import annotations

import torch
from torch import nn

from . import _dispatch
from ._validation import acc_dtype, check_label_range, check_temperature
from .losses import LOSS_TYPES, PreferenceLossOutput, preference_loss, preference_margins
from .ops.linear_logprobs import check_linear_inputs, check_softcap, linear_sequence_logprobs
from .ops.linear_logprobs.pair_loss import fused_linear_pair_loss
from .ops.linear_spa_logprobs import linear_spa_sequence_logprobs

PAIR_LOSS_IMPLS = ("cpu", "cuda", "triton")  # backends whose log-prob kernels the gradient-in-forward path uses
SPA_NEEDS_NOISY = "loss_type='spa' needs the noisy-pair mask (`noisy`) or lam with `noise_threshold`"


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

    grad_in_forward (default True): with reduction "mean" or "sum" and a gradient to compute, the loss's gradient
    is computed during the forward (ops/linear_logprobs/pair_loss.py): each chunk of whole pairs' logits is built
    once by an ATen matmul, scored by the backend's log-prob kernels and turned into its gradient in place, so the
    policy costs 3 matmuls per token instead of 4 (a forward, then a backward that rebuilds the logits). Peak extra
    memory: the gradients plus one chunk of logits. Backends cpu, cuda and triton (triton without softcap); `losses`
    then comes back detached (the gradient flows through `loss`) and a second backward through the same loss is
    not supported. False: the log-probs path (differentiable `losses`; on a GPU with impl="triton" the fused
    matmul + log-sum-exp kernels, the leanest in memory).

    forward(hidden [2B, T, H], weight [V, H], labels [2B, T], bias=None, *, ref_logps=None | [2B] | (chosen, rejected),
            ref_hidden=None, ref_weight=None, ref_bias=None, noisy=None, margin=None, lam=None,
            noise_threshold=None) -> PreferenceLossOutput (with chosen/rejected log-probs; for spa + lam also the
            extrapolated margins and the noisy mask used).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, average_log_prob: bool | None = None, temperature: float = 1.0,
                 refine_alpha: float = 0.1, simpo_gamma: float = 0.5, lam: float | None = None,
                 noise_threshold: float | None = None, reduction: str = "mean", impl: str = "auto",
                 chunk_size: int | None = None, softcap: float | None = None, grad_in_forward: bool = True):
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
        self.grad_in_forward = bool(grad_in_forward)

    @staticmethod
    def _reference_pairs(ref, ref_logps, rows: int, needs_ref: bool):
        """(ref_chosen, ref_rejected) from the reference pass or the ref_logps argument; (None, None) if unused."""
        if ref is not None:
            return _split_pairs(ref, "hidden")
        if ref_logps is None or not needs_ref:
            return None, None
        if isinstance(ref_logps, (tuple, list)):
            return tuple(ref_logps)
        if ref_logps.shape != (rows,):
            raise ValueError(f"ref_logps must be [{rows}] (chosen then rejected), got {list(ref_logps.shape)}")
        return _split_pairs(ref_logps, "ref_logps")

    def _fused_pair_loss(self, hidden, weight, labels, bias, ref_c, ref_r, margin, noisy):
        """The loss with its gradient computed in the forward, pairs batched into chunks of logits (no logits
        rebuilt in the backward, nothing saved): for the cpu, cuda and triton backends, a scalar loss (reduction
        mean or sum), and a forward that needs a gradient. None where it does not apply (the log-probs path then
        runs). `losses` is then detached: the gradient flows through `loss` only."""
        if not self.grad_in_forward or self.reduction not in ("mean", "sum") or not torch.is_grad_enabled():
            return None
        if not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            return None
        if any(t is not None and t.requires_grad for t in (ref_c, ref_r, margin)):
            return None  # a gradient to these too: the log-probs path gives it
        labels = check_linear_inputs(hidden, weight, labels, bias)
        inv_temperature = 1.0 / check_temperature(self.temperature)
        softcap = check_softcap(self.softcap)
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}")
        name, _ = _dispatch.resolve("linear_logprobs", self.impl,
                                    {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels})
        if name not in PAIR_LOSS_IMPLS or (name == "triton" and softcap is not None):
            return None  # the torch reference has no kernels; Triton's log-prob kernels take no softcap
        kernels = _dispatch.backend("logprobs", name)
        _split_pairs(hidden, "hidden")
        check_label_range(labels, weight.shape[0], self.ignore_index)
        N, T, H = hidden.shape
        B, dev = N // 2, hidden.device
        loss_args = dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                         refine_alpha=self.refine_alpha, simpo_gamma=self.simpo_gamma)
        # Every argument checked at the full batch size before the expensive pass (pair batches see slices).
        zeros = hidden.new_zeros(B, dtype=acc_dtype(hidden.dtype))
        preference_loss(zeros, zeros, None if ref_c is None else zeros, None if ref_r is None else zeros,
                        margin=margin, noisy=noisy, **loss_args)
        for name_, ref in (("ref chosen log-probs", ref_c), ("ref rejected log-probs", ref_r)):
            if ref is not None and tuple(ref.shape) != (B,):
                raise ValueError(f"{name_} must be [{B}], got {list(ref.shape)}")

        order = torch.arange(N, device=dev).view(2, B).t().reshape(-1)  # pair order: chosen 0, rejected 0, ...
        pair_labels = labels.index_select(0, order)
        scored = pair_labels != self.ignore_index
        counts = scored.sum(1)
        if int(counts.sum()) == 0:
            return None
        rows = (order.unsqueeze(1) * T + torch.arange(T, device=dev)).masked_select(scored)
        seq_offsets = [0, *counts.cumsum(0).tolist()]
        denom = counts.clamp(min=1) if self.average_log_prob else None
        scale = 1.0 / B if self.reduction == "mean" else 1.0
        pick = lambda t, sl: None if t is None else t[sl]

        def pair_loss(p0, sums):
            sl = slice(p0, p0 + sums.shape[0] // 2)
            with torch.enable_grad():
                x = sums.detach().requires_grad_()
                logps = x if denom is None else x / denom[2 * sl.start:2 * sl.stop].to(x.dtype)
                out = preference_loss(logps[0::2], logps[1::2], pick(ref_c, sl), pick(ref_r, sl),
                                      margin=pick(margin, sl), noisy=pick(noisy, sl), reduction="sum", **loss_args)
                loss = out.loss * scale
                (grad,) = torch.autograd.grad(loss, x)
            return loss.detach(), grad

        loss, sums = fused_linear_pair_loss(hidden.reshape(N * T, H), weight, bias, pair_labels.masked_select(scored),
                                            rows, seq_offsets, pair_loss, inv_temperature, self.chunk_size, kernels,
                                            softcap)
        logps = sums if denom is None else sums / denom.to(sums.dtype)
        chosen, rejected = logps[0::2], logps[1::2]
        out = preference_loss(chosen, rejected, ref_c, ref_r, margin=margin, noisy=noisy,
                              reduction=self.reduction, **loss_args)
        return PreferenceLossOutput(loss=loss.to(out.loss.dtype), losses=out.losses.detach(),
                                    chosen_rewards=out.chosen_rewards, rejected_rewards=out.rejected_rewards,
                                    chosen_logps=chosen.detach(), rejected_logps=rejected.detach(),
                                    noisy=out.noisy)

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
            ref = None
            if needs_ref and ref_hidden is not None:  # first: its chunk of logits is freed before the policy's pass
                with torch.no_grad():
                    ref = linear_sequence_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias,
                                                   temperature=self.temperature, softcap=self.softcap, **common)
            ref_c, ref_r = self._reference_pairs(ref, ref_logps, hidden.shape[0], needs_ref)
            if self.loss_type == "spa" and noisy is None:
                raise ValueError(SPA_NEEDS_NOISY)
            fused = self._fused_pair_loss(hidden, weight, labels, bias, ref_c, ref_r, margin, noisy)
            if fused is not None:
                return fused
            logps = linear_sequence_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                             softcap=self.softcap, **common)
        chosen, rejected = _split_pairs(logps, "hidden")
        if lam is not None:
            ref_c, ref_r = self._reference_pairs(ref, ref_logps, logps.shape[0], needs_ref)
            extrapolated = preference_margins(ext_c, ext_r, ref_c, ref_r, self.beta)
            if noisy is None:
                if noise_threshold is None:
                    raise ValueError("loss_type='spa' with lam needs `noisy` or `noise_threshold`")
                noisy = extrapolated <= noise_threshold
        if self.loss_type == "spa" and noisy is None:
            raise ValueError(SPA_NEEDS_NOISY)

        out = preference_loss(chosen, rejected, ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
                              label_smoothing=self.label_smoothing, margin=margin,
                              noisy=noisy, refine_alpha=self.refine_alpha,
                              simpo_gamma=self.simpo_gamma, reduction=self.reduction)
        return PreferenceLossOutput(loss=out.loss, losses=out.losses, chosen_rewards=out.chosen_rewards,
                                    rejected_rewards=out.rejected_rewards, chosen_logps=chosen.detach(),
                                    rejected_logps=rejected.detach(),
                                    extrapolated_margins=None if extrapolated is None else extrapolated.detach(),
                                    noisy=out.noisy)
