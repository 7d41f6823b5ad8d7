"""Input checks shared by the public functions and the Python-side backends. Errors name the tensor, its shape
and, for labels, the first bad position."""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/result dtype: float64 stays float64, every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_labels(labels: torch.Tensor, shape: tuple[int, ...], device: torch.device, name: str = "labels",
                 like: str = "logits") -> torch.Tensor:
    """Checks labels' type, shape and device; returns them as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} to match {like}, got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but {like} is on {device}")
    return labels.long()


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """ValueError naming the first label outside [0, vocab) that is not ignore_index."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[pos])
        raise ValueError(f"{name}[{', '.join(map(str, pos))}] = {value} is outside [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")


def check_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits") -> torch.Tensor:
    check_floating(logits, name)
    if logits.dim() != 3:
        raise ValueError(f"{name} must be [N, T, V], got shape {list(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {list(logits.shape)})")
    return check_labels(labels, tuple(logits.shape[:2]), logits.device, like=name)


def check_positive_finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def check_finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def vocab_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels read rows with unit stride over the last dim; other strides are handled without a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
