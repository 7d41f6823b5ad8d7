"""Crash-safe files: atomic writes, JSONL, resumable shards, the run directory layout, seeding.

Every file a stage produces is written to a temporary name and moved into place with os.replace, so a file that
exists is complete. Long stages work in shards under output_dir/.partial/ and skip the shards already written when
rerun; a stage's final output appears only when the whole stage is done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

# Testing aid for crash safety: SPA_CRASH_AFTER="<unit>:<n>" SIGKILLs the process right after the n-th unit of
# work of that kind is committed (units: generate, judge, eval, sft, train, i.e. shards and checkpoints).
CRASH_ENV = "SPA_CRASH_AFTER"
_crash_counts: dict[str, int] = {}


def crash_point(unit: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != unit:
        return
    _crash_counts[unit] = _crash_counts.get(unit, 0) + 1
    if _crash_counts[unit] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class OutputDirLocked(RuntimeError):
    """Another process is running a stage (or the loop) on the same output directory."""


LOCK_FILE = ".lock"
_held_locks: dict[str, list] = {}  # lock path -> [fd, depth]: the lock is re-entrant within a process


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """Holds an exclusive lock on output_dir (fcntl.flock on output_dir/.lock) for the duration of the block, so two
    processes never write one run at once. The holder writes its PID and host into the lock file; a second process
    fails at once with OutputDirLocked naming them. The kernel releases the lock when the holder exits, however it
    exits (SIGKILL included), so a stale lock file never blocks a rerun. Nested use in one process is allowed."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
    if path in _held_locks:
        _held_locks[path][1] += 1
        try:
            yield
        finally:
            _held_locks[path][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process that has not written its PID yet"
        os.close(fd)
        raise OutputDirLocked(f"{output_dir} is in use by another spa process ({holder}; lock file {path}); wait for "
                              "it to finish or stop it (the lock goes with the process)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        _held_locks[path] = [fd, 1]
        yield
    finally:
        _held_locks.pop(path, None)
        os.ftruncate(fd, 0)  # before unlocking: a waiting process never reads a stale PID
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _tmp(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_dir(final: str) -> str:
    """A fresh temporary folder next to `final`; commit it with commit_dir(tmp, final)."""
    tmp = f"{final}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, final: str) -> None:
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_partial(folder: str) -> None:
    """Deletes a finished stage's work folder under .partial/, and its parents once they are empty."""
    shutil.rmtree(folder, ignore_errors=True)
    parent = os.path.dirname(folder)
    while os.path.basename(parent) != "" and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)
        if os.path.basename(parent) == ".partial":
            break
        parent = os.path.dirname(parent)


def derive_seed(*keys) -> int:
    """A 31-bit seed from a hash of `keys` (stable across processes, runs and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(*keys) -> int:
    """Seeds python, numpy and torch from a hash of `keys` (e.g. (cfg.seed, "generate", 3)); returns the seed.
    Each stage and shard seeds itself, so a resumed one draws the same numbers as an uninterrupted one."""
    seed = derive_seed(*keys)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def sharded(items: list, shard_size: int, folder: str, unit: str,
            work: Callable[[int, list], list[dict]], progress: str | None = None) -> Iterator[list[dict]]:
    """Yields the output rows of each shard of `items`, in order, running `work(shard_index, shard_items)` only for
    shards not already written to folder/shard_<i>.jsonl by an earlier (interrupted) run. `progress`: a bar over
    the shards, labelled so (main process only).

    Under a multi-process launch every process must call it with the same items: the shards still missing (as the
    main process sees them) are split between the processes in contiguous runs, each process writes the shard files
    it computes (committed one by one, so a killed run keeps them), and every process then yields all the shards
    in order. A shard is computed the same way whichever process computes it, so the rows do not depend on the
    number of processes."""
    from tqdm.auto import tqdm

    from . import distributed as dist

    os.makedirs(folder, exist_ok=True)
    starts = range(0, len(items), shard_size)
    paths = [os.path.join(folder, f"shard_{start // shard_size:05d}.jsonl") for start in starts]
    done = sum(os.path.exists(p) for p in paths)
    if done and dist.is_main():
        logging.getLogger("spa").info("%s: resuming: %d of %d shards are done already (%s), %d to compute", unit,
                                      done, len(paths), folder, len(paths) - done)

    def compute(index: int) -> list[dict]:
        start = index * shard_size
        rows = work(index, items[start:start + shard_size])
        atomic_write_jsonl(paths[index], rows)
        crash_point(unit)
        return rows

    if not dist.is_distributed():
        for index, path in enumerate(tqdm(paths, desc=progress, disable=progress is None, leave=False,
                                          unit="shard")):
            yield read_jsonl(path) if os.path.exists(path) else compute(index)
        return
    # The main process's view of what is missing, taken before any process starts writing shards.
    pending = dist.broadcast([i for i, p in enumerate(paths) if not os.path.exists(p)] if dist.is_main() else None)
    mine = dist.split(pending)

    def compute_mine() -> dict[int, list[dict]]:
        bar = tqdm(mine, desc=progress and f"{progress} (process 0 of {dist.world_size()})", leave=False,
                   disable=progress is None or not dist.is_main(), unit="shard")
        return {index: compute(index) for index in bar}

    computed: dict[int, list[dict]] = {}
    for part in dist.gather(dist.agree(compute_mine, f"{unit} shards")):
        computed.update(part)
    for index, path in enumerate(paths):
        yield computed[index] if index in computed else read_jsonl(path)


class Layout:
    """Where a run keeps everything (docs/trainer.md shows the tree)."""

    def __init__(self, output_dir: str):
        self.root = output_dir

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    @property
    def metrics(self) -> str:
        return self.path("metrics.json")

    @property
    def sft_model(self) -> str:
        return self.path("sft", "model")

    def iter_dir(self, i: int) -> str:
        return self.path(f"iter_{i}")

    def model(self, i: int) -> str:
        return self.path(f"iter_{i}", "model")

    def samples(self, i: int) -> str:
        return self.path(f"iter_{i}", "samples.jsonl")

    def pairs(self, i: int) -> str:
        return self.path(f"iter_{i}", "pairs.jsonl")

    def validation(self, i: int) -> str:
        return self.path(f"iter_{i}", "validation.json")

    def validation_pairs(self, i: int) -> str:
        return self.path(f"iter_{i}", "validation_pairs.json")

    @property
    def selected(self) -> str:
        return self.path("selected.json")

    def eval(self, name: str) -> str:
        """name: 'sft' or 'iter_<i>'."""
        return self.path(name, "eval.json")

    def eval_samples(self, name: str) -> str:
        return self.path(name, "eval_samples.jsonl")

    def stage_metrics(self, name: str, stage: str) -> str:
        return self.path(name, f"{stage}_metrics.json")

    def partial(self, name: str, stage: str) -> str:
        return self.path(".partial", name, stage)


def eval_name(iteration: int | None) -> str:
    """The run-directory folder of a model's evaluation: sft, or iter_<i>."""
    return "sft" if iteration is None else f"iter_{iteration}"
