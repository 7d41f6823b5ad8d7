"""SPA's self-refinement: which pairs are noisy, and how much to trust them.

A pair is noisy when its margin beta*h (with de-coupled noise detection, DND: beta*h_g from the extrapolated logits
(1+lam)*z_theta - lam*z_ref) is at or below the K-th percentile (K = 10%) of a running window of the last 50
margins; the current batch enters the window before the percentile is taken, so the first batch has a threshold.
The loss then softens noisy labels: -(1 - a z) logsig(beta h) - a z logsig(-beta h) (spa_kernels'
loss_type="spa"), with a = 0 during the first 20% of the iteration's steps (warm-up).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class NoiseDetector:
    """Running-percentile noisy-pair detector; state_dict() / load_state_dict() survive a checkpoint."""

    def __init__(self, percentile: float = 10.0, window: int = 50):
        self.percentile, self.window = float(percentile), int(window)
        self.margins: deque[float] = deque(maxlen=self.window)

    def __call__(self, margins: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(noisy [B] bool, threshold) for a batch of margins; the batch joins the window first."""
        self.margins.extend(margins.detach().float().cpu().tolist())
        threshold = float(np.percentile(np.asarray(self.margins, dtype=np.float64), self.percentile))
        return margins.detach() <= threshold, threshold

    def state_dict(self) -> dict:
        return {"percentile": self.percentile, "window": self.window, "margins": list(self.margins)}

    def load_state_dict(self, state: dict) -> None:
        self.percentile, self.window = float(state["percentile"]), int(state["window"])
        self.margins = deque(state["margins"], maxlen=self.window)


def refine_alpha(step: int, total_steps: int, alpha: float = 0.1, warmup_ratio: float = 0.2) -> float:
    """a at optimizer step `step` (0-based) of `total_steps`: 0 during the warm-up fraction, then alpha."""
    return 0.0 if step < warmup_ratio * total_steps else alpha


def lam_for_iteration(lams: list[float], iteration: int) -> float:
    """lam for SPA iteration i >= 1: lams[i-1], the last value repeating (paper: 1/2, 1/4, 1/8)."""
    if iteration < 1:
        raise ValueError(f"lam is defined for iterations >= 1, got {iteration}")
    return float(lams[min(iteration, len(lams)) - 1])
