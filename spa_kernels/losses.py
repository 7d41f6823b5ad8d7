"""preference_loss: every DPO-family loss on [B] per-sequence log-prob vectors.

With h = (logp_c - ref_c) - (logp_r - ref_r) (the implicit-reward margin divided by beta) and eps = label_smoothing:

  sigmoid  -(1 - eps) logsig(b h) - eps logsig(-b h)                 DPO; eps > 0 is conservative DPO (cDPO)
  robust   (-(1 - eps) logsig(b h) + eps logsig(-b h)) / (1 - 2 eps)  robust DPO (Chowdhury et al. 2024)
  ipo      (h - 1 / (2 b))^2                                          IPO (use average log-probs, as TRL does)
  hinge    relu(1 - b h)                                              SLiC
  spa      -(1 - a z) logsig(b h) - a z logsig(-b h)                  SPA self-refinement; z = noisy mask, a = refine_alpha
  dlma     -logsig(b (h - margin))                                    DLMA; margin = gamma * clamp(R, -40, 40), see dlma_margin
  simpo    -(1 - eps) logsig(b h' - g) - eps logsig(-(b h' - g))      SimPO, h' = logp_c - logp_r (no reference), g = simpo_gamma

sigmoid, robust, ipo and hinge match TRL's DPOTrainer; simpo matches TRL's CPOTrainer (loss_type="simpo").
Rewards are b (logp - ref) (b logp for simpo), detached, as TRL logs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._validation import acc_dtype

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "spa", "dlma", "simpo")


@dataclass(frozen=True)
class PreferenceLossOutput:
    """loss: reduced loss; losses: [B] per pair; chosen_rewards / rejected_rewards: [B], detached.
    The optional fields are filled by FusedLinearPreferenceLoss (detached [B] vectors)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    extrapolated_margins: torch.Tensor | None = None  # beta * h computed from the extrapolated logits (SPA's DND)
    noisy: torch.Tensor | None = None  # the noisy-pair mask that was used (loss_type="spa")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """TRL's metric names and meanings: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected (means over the batch)."""
        cr, rr = self.chosen_rewards.float(), self.rejected_rewards.float()
        out = {
            "rewards/chosen": cr.mean().item(),
            "rewards/rejected": rr.mean().item(),
            "rewards/accuracies": (cr > rr).float().mean().item(),
            "rewards/margins": (cr - rr).mean().item(),
        }
        if self.chosen_logps is not None:
            out["logps/chosen"] = self.chosen_logps.float().mean().item()
            out["logps/rejected"] = self.rejected_logps.float().mean().item()
        if self.noisy is not None:
            out["refine/noisy_fraction"] = self.noisy.float().mean().item()
        return {prefix + k: v for k, v in out.items()}


def preference_margins(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                       ref_rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * h = beta * ((logp_c - ref_c) - (logp_r - ref_r)) per pair, detached. With the log-probs of the
    extrapolated logits (1 + lam) z - lam z_ref in place of logp (linear_spa_sequence_logprobs), this is SPA's
    de-coupled noise-detection margin; spa.refine compares it with a running percentile to mark noisy pairs."""
    return (beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))).detach()


def dlma_margin(self_reward: torch.Tensor, gamma: float = 0.2, clamp: float = 40.0) -> torch.Tensor:
    """DLMA's margin gamma * clamp(R, -clamp, clamp) from the contrastive self-reward R (spa.judges computes R)."""
    return gamma * self_reward.float().clamp(-clamp, clamp)


def _check_vec(t, name, B=None, device=None, allow_none=False):
    if t is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a [B] vector, got shape {list(t.shape)}")
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name} has {t.shape[0]} entries but chosen_logps has {B}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but chosen_logps is on {device}")
    return t


def _real(value, name: str) -> float:
    """A Python / NumPy / 0-d tensor real number as float (bool is refused: beta=True is a mistake, not 1.0)."""
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def _check_noisy(noisy, B, device) -> torch.Tensor:
    """The [B] noisy-pair mask: bool, or numeric with every value exactly 0 or 1 (a soft weight is not a mask)."""
    z = _check_vec(noisy, "noisy (loss_type='spa' needs the [B] noisy-pair mask from spa.refine)", B, device)
    if z.dtype != torch.bool:
        if z.is_complex() or not bool(((z == 0) | (z == 1)).all()):
            raise ValueError("noisy must be a bool mask, or numeric with every value exactly 0 or 1; got "
                             f"{z.dtype} values {z.detach().flatten()[:8].tolist()}")
    return z


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    margin: torch.Tensor | None = None, noisy: torch.Tensor | None = None,
                    refine_alpha: float = 0.1, simpo_gamma: float = 0.5,
                    reduction: str = "mean") -> PreferenceLossOutput:
    """DPO-family loss on [B] per-sequence log-probs (see the module docstring for the formulas).

    beta: finite, > 0. refine_alpha: in [0, 1] (loss_type="spa"). noisy: [B] mask of pairs judged noisy
    (loss_type="spa"): a bool tensor, or a numeric one whose every value is exactly 0 or 1. margin: [B]
    (loss_type="dlma"). ref_* are required, except for loss_type="simpo", which is reference-free and takes None
    for both. reduction: "mean" | "sum" | "none". A bad argument raises ValueError naming it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of ('mean', 'sum', 'none')")
    beta = _real(beta, "beta")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    refine_alpha = _real(refine_alpha, "refine_alpha")
    if not 0.0 <= refine_alpha <= 1.0:
        raise ValueError(f"refine_alpha must be a number in [0, 1], got {refine_alpha!r}")
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust", "simpo"):
        raise ValueError(f"label_smoothing applies to sigmoid, robust and simpo, not {loss_type!r}")
    _check_vec(chosen_logps, "chosen_logps")
    B, dev = chosen_logps.shape[0], chosen_logps.device
    _check_vec(rejected_logps, "rejected_logps", B, dev)
    no_ref = loss_type == "simpo"
    if no_ref and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError("loss_type='simpo' is reference-free: pass ref_chosen_logps=None and "
                         "ref_rejected_logps=None (reference log-probs would be ignored)")
    _check_vec(ref_chosen_logps, "ref_chosen_logps", B, dev, allow_none=no_ref)
    _check_vec(ref_rejected_logps, "ref_rejected_logps", B, dev, allow_none=no_ref)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (simpo only)")
    if margin is not None and loss_type != "dlma":
        raise ValueError(f"margin is used by loss_type='dlma' only, got loss_type={loss_type!r}")
    if noisy is not None and loss_type != "spa":
        raise ValueError(f"noisy is used by loss_type='spa' only, got loss_type={loss_type!r}")

    dt = acc_dtype(chosen_logps.dtype)
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    if not no_ref:
        rc, rr = ref_chosen_logps.to(dt), ref_rejected_logps.to(dt)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        h = (pc - rc) - (pr - rr)
    else:  # simpo: reference-free
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
        h = pc - pr
    eps = float(label_smoothing)

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "spa":
        z = _check_noisy(noisy, B, dev)
        az = refine_alpha * z.to(dt)
        losses = -(1 - az) * F.logsigmoid(beta * h) - az * F.logsigmoid(-beta * h)
    elif loss_type == "dlma":
        m = _check_vec(margin, "margin (loss_type='dlma' needs [B] margins, see dlma_margin)", B, dev)
        losses = -F.logsigmoid(beta * (h - m.to(dt)))
    else:  # simpo
        x = beta * h - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)

    if reduction == "mean":
        loss = losses.mean() if B else losses.sum()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    return PreferenceLossOutput(loss=loss, losses=losses, chosen_rewards=chosen_rewards.detach(),
                                rejected_rewards=rejected_rewards.detach(),
                                noisy=None if noisy is None else noisy.detach())
