"""Input checks shared by the public functions and the Python-side backends. Errors name the tensor, its shape
and, for labels, the first bad position.

Label range checks of the GPU kernels: a kernel that meets a label outside [0, V) scores it as ignored (never reads
out of bounds) and records its flat index in a [1] int64 device flag; check_label_flag reads the flag as the current
label_check mode says:
  "sync"      (validate=True, the default) now: ValueError in this call. One 8-byte device-to-host copy, so the host
              waits for the kernel.
  "deferred"  (validate=False) without a host synchronisation: the flag is copied to pinned memory behind a CUDA event
              and read once the event has completed, at the start of a later spa_kernels CUDA kernel call (forward or
              backward), which raises the ValueError; flush_label_checks() waits for and raises every pending one.
  "trusted"   the caller has already checked the labels (the chunked linear paths): the flag is not read.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import math
import threading
import warnings
from collections import deque

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


def bad_label_message(pos: tuple[int, ...], value: int, vocab: int, ignore_index: int, name: str = "labels") -> str:
    return (f"{name}[{', '.join(map(str, pos))}] = {value} is outside [0, {vocab}) and is not ignore_index "
            f"({ignore_index})")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """ValueError naming the first label outside [0, vocab) that is not ignore_index."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(bad_label_message(pos, int(labels[pos]), vocab, ignore_index, name))


# ---- device-side label flags (see the module docstring) ----------------------------------------------------------
NO_BAD_LABEL = torch.iinfo(torch.int64).max
LABEL_CHECKS = ("sync", "deferred", "trusted")
_label_check: contextvars.ContextVar[str] = contextvars.ContextVar("spa_kernels_label_check", default="sync")


@contextlib.contextmanager
def label_check(mode: str):
    """How check_label_flag treats the kernels' bad-label flags inside the block: "sync", "deferred", "trusted"."""
    if mode not in LABEL_CHECKS:
        raise ValueError(f"label check mode must be one of {LABEL_CHECKS}, got {mode!r}")
    token = _label_check.set(mode)
    try:
        yield
    finally:
        _label_check.reset(token)


def label_check_for(validate: bool) -> str:
    """The label check mode of a public function's validate= argument."""
    return "sync" if validate else "deferred"


def _flat_bad_label_message(labels: torch.Tensor, flat: int, vocab: int, ignore_index: int, name: str) -> str:
    pos = divmod(flat, labels.shape[1]) if labels.dim() == 2 else (flat,)
    return bad_label_message(tuple(pos), int(labels.reshape(-1)[flat]), vocab, ignore_index, name)


class _DeferredLabelChecks:
    """Bad-label flags of validate=False calls, each copied to pinned host memory behind a CUDA event."""

    def __init__(self):
        self._pending: deque = deque()
        self._lock = threading.Lock()

    def push(self, flag: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int, name: str) -> None:
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        # The copy is queued on the current stream of the flag's device (where the kernel that wrote the flag ran);
        # the event must be recorded on that same stream, whichever device is current for the caller, or it could
        # complete before the copy and the host would read the pinned buffer before it is written.
        with torch.cuda.device(flag.device):
            stream = torch.cuda.current_stream(flag.device)
            with torch.cuda.stream(stream):
                host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        with self._lock:
            self._pending.append((event, host, labels, vocab, ignore_index, name))

    def raise_ready(self, wait: bool) -> None:
        """Drops the completed checks that found nothing; raises ValueError for the oldest completed one that found a
        bad label. wait=True first waits for every pending check."""
        found = None
        with self._lock:
            keep = deque()
            for item in self._pending:
                event, host = item[0], item[1]
                if found is not None or not (wait or event.query()):
                    keep.append(item)
                    continue
                if wait:
                    event.synchronize()
                if int(host[0]) != NO_BAD_LABEL:
                    found = item
            self._pending = keep
        if found is not None:
            _, host, labels, vocab, ignore_index, name = found
            raise ValueError(_flat_bad_label_message(labels, int(host[0]), vocab, ignore_index, name)
                             + f" (found on the GPU by an earlier call with validate=False; labels of shape "
                               f"{list(labels.shape)})")

    def __len__(self) -> int:
        return len(self._pending)


_deferred = _DeferredLabelChecks()


def check_label_flag(flag: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int,
                     name: str = "labels") -> None:
    """Reads a kernel's [1] int64 bad-label flag (NO_BAD_LABEL = none) as the current label_check mode says."""
    mode = _label_check.get()
    if mode == "trusted":
        return
    capturing = flag.is_cuda and torch.cuda.is_current_stream_capturing()
    if mode == "sync":
        if capturing:
            raise RuntimeError("label validation reads a device flag, which CUDA graph capture forbids; pass "
                               "validate=False (out-of-range labels are then scored as ignored, never read)")
        flat = int(flag.item())
        if flat != NO_BAD_LABEL:
            raise ValueError(_flat_bad_label_message(labels, flat, vocab, ignore_index, name))
    elif not capturing:  # inside a captured graph there is no later point to read the flag at
        _deferred.push(flag, labels, vocab, ignore_index, name)


def raise_deferred_label_errors() -> None:
    """Raises the error of a completed deferred label check, without waiting for the GPU (kernel entry points call
    this first)."""
    if len(_deferred) and not torch.cuda.is_current_stream_capturing():  # no event queries inside a capture
        _deferred.raise_ready(wait=False)


def flush_label_checks() -> None:
    """Waits for every pending deferred label check (calls made with validate=False) and raises ValueError for the
    first that found a label outside [0, V) (a host synchronisation: call it at a point of your choosing, e.g. at
    the end of an epoch or in a debugging session)."""
    if len(_deferred):
        _deferred.raise_ready(wait=True)


@atexit.register
def _report_unchecked_labels() -> None:
    """Bad labels found by the last deferred checks of a run would otherwise go unreported."""
    try:
        flush_label_checks()
    except ValueError as e:
        warnings.warn(f"spa_kernels: {e}", RuntimeWarning, stacklevel=1)
    except Exception:  # noqa: BLE001 - CUDA may already be torn down at exit; nothing left to report then
        pass


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


# Temperatures whose reciprocal, or which themselves, leave float32's normal range: logits / temperature would
# overflow to inf or lose every digit to subnormal flushing, so no backend could honour them.
_F32 = torch.finfo(torch.float32)
MIN_TEMPERATURE = float(_F32.tiny)
MAX_TEMPERATURE = 1.0 / float(_F32.tiny)


def check_temperature(value: float, name: str = "temperature") -> float:
    """A positive finite temperature with 1/temperature a normal float32 (every backend scales by it in float32)."""
    value = check_positive_finite(value, name)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must lie in [{MIN_TEMPERATURE:.3g}, {MAX_TEMPERATURE:.3g}] (1/{name} must be a "
                         f"normal float32 number), got {value}")
    return value


def check_finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share memory (a stride-0 / expanded dimension, or strides that interleave).
    Conservative: False means they certainly do not."""
    reach = 0  # the largest offset the smaller-stride dimensions reach
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def use_inplace_backward(logits: torch.Tensor, inplace_backward: bool, name: str = "logits") -> bool:
    """Whether the backward may write the gradient into `logits`' buffer (checked before any compute).

    ValueError when `logits` is, or is a view of, a leaf tensor that requires grad: the user's own tensor would be
    overwritten and its .grad would alias it. False (a regular gradient buffer, no error) when elements of `logits`
    share memory (e.g. `logits.expand(...)`): rows written into the same memory would corrupt each other."""
    if not inplace_backward or not logits.requires_grad:
        return False
    base = logits if logits._base is None else logits._base
    if base.is_leaf:
        raise ValueError(f"inplace_backward=True would write the gradient into {name}, which is (a view of) a leaf "
                         f"tensor that requires grad: the tensor would be overwritten and its .grad would alias "
                         f"it. Use inplace_backward=False, or pass logits computed by the model (e.g. its output)")
    return not may_overlap(logits)


def vocab_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels read rows with unit stride over the last dim; other strides are handled without a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
