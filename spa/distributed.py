"""Multi-process runs: `accelerate launch --num_processes N -m spa.cli run CONFIG.yaml` (or torchrun).

Every process runs the same loop. The generate, judge and eval stages split their shards across the processes
(whole shards: a shard's sampling is seeded by its index, so the outputs do not depend on the number of
processes), the train and sft stages are data-parallel through transformers.Trainer, and the main process alone
writes the shared files (the output_dir lock, config.yaml, metrics.json, every stage's outputs) while the others
wait at a barrier. A process that fails makes every process raise (`agree`), naming the failed rank, instead of
leaving the others waiting; a process that hangs is given up on after SPA_DIST_TIMEOUT_S seconds (default 1800,
the process-group timeout of every barrier and gather).

In a single process (no launcher) every helper here is a no-op and nothing from torch.distributed is touched.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

TIMEOUT_ENV = "SPA_DIST_TIMEOUT_S"


class RankFailed(RuntimeError):
    """Another process of a multi-process run failed; this one stops too."""


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return launched_world_size() > 1


def _state():
    # A fresh handle each time: transformers.TrainingArguments resets accelerate's shared state (the process group
    # itself survives), so a cached PartialState object would be emptied under us.
    from accelerate import PartialState

    return PartialState()


def init(cpu: bool | None = None) -> None:
    """Joins the process group of a launched multi-process run (gloo when `cpu`, default: when no GPU is visible;
    else nccl), with the SPA_DIST_TIMEOUT_S timeout for every collective; nothing in a single process."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if not (dist.is_available() and dist.is_initialized()):
        raw = os.environ.get(TIMEOUT_ENV, "1800").strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
        cpu = not torch.cuda.is_available() if cpu is None else cpu
        PartialState(cpu=cpu, timeout=timedelta(seconds=int(raw)))
    if _state().num_processes != launched_world_size():  # never run N copies of a single-process loop
        raise RuntimeError(f"launched with WORLD_SIZE={launched_world_size()} but accelerate set up "
                           f"{_state().num_processes} process(es) ({_state().distributed_type})")


def rank() -> int:
    return _state().process_index if is_distributed() else 0


def world_size() -> int:
    return _state().num_processes if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        _state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """The main process's `value`, on every process (a picklable object)."""
    if not is_distributed():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather(value: Any) -> list:
    """[value of rank 0, value of rank 1, ...] on every process (picklable objects)."""
    if not is_distributed():
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def agree(fn: Callable[[], Any], what: str) -> Any:
    """Runs fn() on every process, then checks with the others: if fn raised on any process, every process raises
    (the failed one its own exception, the others RankFailed naming the rank and its error), so no process is left
    waiting at a later barrier. Every process must call agree at the same point."""
    if not is_distributed():
        return fn()
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        error = e
    report = None if error is None else f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"
    reports = gather(report)
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise RankFailed(f"{what}: process {r} of {len(reports)} failed: {msg.splitlines()[0]}")
    return result


def shutdown() -> None:
    """After a successful run: every process passes a barrier, then leaves the process group (a gloo connection
    closed while its peer still uses it aborts the peer at exit)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def split(items: Sequence) -> list:
    """This process's contiguous share of `items` (accelerate's split_between_processes; all of them alone)."""
    if not is_distributed():
        return list(items)
    with _state().split_between_processes(list(items)) as mine:
        return list(mine)


__all__ = ["RankFailed", "TIMEOUT_ENV", "agree", "barrier", "broadcast", "gather", "init", "is_distributed", "is_main",
           "launched_world_size", "rank", "shutdown", "split", "world_size"]
