"""Measured choice between the "cuda" and "triton" implementations for impl="auto" on a GPU.

    python -m spa_kernels.autotune              # measure every op on this GPU, write the table, print it
    python -m spa_kernels.autotune --show       # print the table for this GPU
    python -m spa_kernels.autotune --clear      # delete it

The table is a JSON file per GPU model and software versions,
~/.cache/spa_kernels/autotune-<gpu>-torch<v>-triton<v>-spa<v>.json (SPA_KERNELS_CACHE_DIR, else XDG_CACHE_HOME, picks
the directory), with one entry per (op, dtype, vocabulary bucket V <= 2^k): the forward+backward milliseconds of each
candidate and the order they give. impl="auto" on CUDA tensors takes the fastest usable candidate of the entry that
matches the call (spa_kernels/_dispatch.py). An entry that is missing is measured on first use ("lazy": a few
milliseconds of GPU time after Triton's compile, at a small shape with the call's V, H and dtype, within a bounded
share of free memory) and added to the file; SPA_KERNELS_AUTOTUNE=0 turns that off, and "auto" then falls back to
the static order in _dispatch.AUTO_ORDER_CUDA_DEFAULT. Nothing is measured while torch.compile traces or a CUDA graph
is being captured. The timing function, _time_impl, is the one seam tests replace.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import warnings
from datetime import datetime, timezone
from functools import cache

import torch

CANDIDATES = ("cuda", "triton")
OPS = ("logprobs", "spa_logprobs", "linear_logprobs", "linear_spa_logprobs")
LINEAR_OPS = ("linear_logprobs", "linear_spa_logprobs")
# Shapes: the command's defaults (a Llama-3 sized vocabulary and a 7B hidden size); lazy runs use the call's V and H
# with at most MAX_TOKENS tokens and LAZY_FREE_FRACTION of free memory (fewer tokens / a smaller H when needed).
COMMAND_TOKENS = 4096
MAX_TOKENS = 4096
MIN_TOKENS = 256
LAZY_FREE_FRACTION = 1 / 8
REPS = 10

_lock = threading.Lock()
_tables: dict[str, dict] = {}  # path -> table, as read from / written to disk by this process
_failed: dict[str, str] = {}  # entry key -> why its lazy measurement failed (not retried in this process)
_measuring = threading.local()


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "off", "false", "no")


def cache_dir() -> str:
    if os.environ.get("SPA_KERNELS_CACHE_DIR"):
        return os.environ["SPA_KERNELS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spa_kernels")


@cache
def gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _versions() -> dict:
    from . import __version__

    out = {"torch": torch.__version__, "spa_kernels": __version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: the table then only ever holds cuda
        out["triton"] = "none"
    return out


def table_path(device_name: str) -> str:
    return _table_path(device_name, cache_dir())


@cache  # impl="auto" asks for it on every call
def _table_path(device_name: str, directory: str) -> str:
    v = _versions()
    slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()
    name = f"autotune-{slug(device_name)}-torch{slug(v['torch'])}-triton{slug(v['triton'])}-spa{slug(v['spa_kernels'])}"
    return os.path.join(directory, name + ".json")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table.get("entries"), dict):
            raise ValueError("no 'entries' object")
        return table
    except FileNotFoundError:
        return {"entries": {}}
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"spa_kernels: ignoring the unreadable autotune table {path} ({e})", RuntimeWarning,
                      stacklevel=3)
        return {"entries": {}}


def load_table(path: str) -> dict:
    with _lock:
        if path not in _tables:
            _tables[path] = _read(path)
        return _tables[path]


def save_entries(path: str, device_name: str, entries: dict) -> None:
    """Merges entries into the file (re-read first: other processes may have added theirs) atomically."""
    with _lock:
        table = _read(path)
        table["entries"].update(entries)
        table.update(device=device_name, versions=_versions())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        _tables[path] = table


def clear_cache() -> None:
    """Forgets the tables read by this process (the files stay)."""
    with _lock:
        _tables.clear()
        _failed.clear()


# ---- what is measured ----------------------------------------------------------------------------------------------
def spec_of(op: str, tensors: dict) -> dict | None:
    """The workload that stands for a call: dtype, V (and H for the linear ops)."""
    if op in LINEAR_OPS:
        w = tensors.get("weight")
        return None if w is None else {"dtype": str(w.dtype).replace("torch.", ""), "V": int(w.shape[0]),
                                       "H": int(w.shape[1])}
    x = tensors.get("logits")
    return None if x is None else {"dtype": str(x.dtype).replace("torch.", ""), "V": int(x.shape[-1])}


def entry_key(op: str, spec: dict) -> str:
    bucket = 1 << max(0, math.ceil(math.log2(max(spec["V"], 1))))
    return f"{op}|{spec['dtype']}|V<={bucket}"


def _fit(op: str, spec: dict, free_bytes: int, tokens: int = MAX_TOKENS,
         fraction: float = LAZY_FREE_FRACTION) -> dict | None:
    """Tokens (and H) such that the workload takes at most `fraction` of free memory; None if none fits."""
    es = torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
    budget = free_bytes * fraction
    V = spec["V"]
    streams = 2 if "spa" in op else 1  # policy + reference logits (or weights)
    if op in LINEAR_OPS:
        H = spec["H"]
        while H > 256 and streams * V * H * es + V * H * 4 > budget / 2:  # weights + the float32 weight gradient
            H //= 2
        spec = {**spec, "H": H}
        budget -= streams * V * H * es + V * H * 4
    per_token = 3 * streams * V * es  # logits, their gradient, the chunk buffer / eager temporaries
    tokens = min(tokens, int(budget // per_token))
    return None if tokens < MIN_TOKENS else {**spec, "tokens": tokens}


def _workload(op: str, impl: str, spec: dict, device: torch.device):
    """A closure running one forward + backward of `op` with `impl` on seeded random inputs."""
    import spa_kernels as sk

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    V, M = spec["V"], spec["tokens"]
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, (1, M), generator=gen, device=device)
    if op in LINEAR_OPS:
        H = spec["H"]
        h, w = rand(1, M, H).requires_grad_(), rand(V, H, scale=H ** -0.5).requires_grad_()
        leaves = (h, w)
        if op == "linear_logprobs":
            run = lambda: sk.linear_sequence_logprobs(h, w, labels, impl=impl)
        else:
            rh, rw = rand(1, M, H), rand(V, H, scale=H ** -0.5)
            run = lambda: sk.linear_spa_sequence_logprobs(h, w, rh, rw, labels, lam=0.5, impl=impl)[0]
    else:
        x = rand(1, M, V, scale=3.0).requires_grad_()
        leaves = (x,)
        if op == "logprobs":
            run = lambda: sk.sequence_logprobs(x, labels, impl=impl)
        else:
            xr = rand(1, M, V, scale=3.0)
            run = lambda: sk.spa_sequence_logprobs(x, xr, labels, lam=0.5, impl=impl)[0]

    def step():
        for t in leaves:
            t.grad = None
        with torch.enable_grad():
            run().sum().backward()

    return step


def _time_impl(op: str, impl: str, spec: dict, device: torch.device) -> float:
    """Median forward+backward milliseconds of `impl` on the workload `spec` (CUDA events; the first run, which
    compiles Triton kernels, is not timed)."""
    with torch.cuda.device(device):
        step = _workload(op, impl, spec, device)
        step()
        torch.cuda.synchronize(device)
        events = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _candidates(op: str, tensors: dict | None = None, spec: dict | None = None) -> tuple[str, ...]:
    """The candidates usable for these tensors (or, for the command, for small GPU tensors shaped like `spec`)."""
    from . import _dispatch

    if tensors is None:
        tensors = _probe_tensors(op, spec)
    return tuple(n for n in CANDIDATES if _dispatch.unusable_reason(op, n, tensors) is None)


def measure(op: str, spec: dict, candidates, device: torch.device, source: str) -> dict:
    """Times each candidate on the workload and returns the table entry."""
    ms = {impl: float(_time_impl(op, impl, spec, device)) for impl in candidates}
    return {"ms": ms, "order": sorted(ms, key=ms.get), "shape": spec, "source": source,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def _lazy_allowed() -> bool:
    if _env_off("SPA_KERNELS_AUTOTUNE") or getattr(_measuring, "active", False):
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def order_for(op: str, device: torch.device, tensors: dict) -> tuple[str, ...] | None:
    """The measured order (fastest first) of the candidates for this call, measuring it now if it is missing and
    lazy tuning is allowed; None when there is nothing to choose between or no measurement."""
    spec = spec_of(op, tensors)
    if spec is None:
        return None
    candidates = _candidates(op, tensors)
    if len(candidates) < 2:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = gpu_name(index)
    path = table_path(name)
    key = entry_key(op, spec)
    entry = load_table(path)["entries"].get(key)
    if entry is None:
        if key in _failed or not _lazy_allowed():
            return None
        fitted = _fit(op, spec, _free_bytes(device))
        if fitted is None:
            _failed[key] = "not enough free GPU memory to measure"
            return None
        _measuring.active = True
        try:
            entry = measure(op, fitted, candidates, torch.device("cuda", index), "lazy")
            save_entries(path, name, {key: entry})
        except Exception as e:  # noqa: BLE001 - a failed measurement must not fail the caller's op
            _failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"spa_kernels: could not measure {key} for impl='auto' ({_failed[key]}); using the static "
                          f"order", RuntimeWarning, stacklevel=2)
            return None
        finally:
            _measuring.active = False
    order = tuple(n for n in entry.get("order", ()) if n in candidates)
    return order or None


def _free_bytes(device: torch.device) -> int:
    from .ops.linear_logprobs.chunked import free_device_bytes

    return free_device_bytes(device)


# ---- the command ---------------------------------------------------------------------------------------------------
def tune(ops=OPS, dtypes=("bfloat16", "float32"), vocabs=(32000, 128256), hidden=4096, tokens=COMMAND_TOKENS,
         device=None, log=print) -> dict:
    """Measures every (op, dtype, V) on the GPU and writes the table; returns the entries written."""
    device = torch.device(device or "cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    name = gpu_name(index)
    entries = {}
    for op in ops:
        for dtype in dtypes:
            for V in vocabs:
                spec = {"dtype": dtype, "V": int(V), **({"H": int(hidden)} if op in LINEAR_OPS else {})}
                key = entry_key(op, spec)
                candidates = _candidates(op, spec=spec)
                if len(candidates) < 2:
                    log(f"{key}: only {candidates or 'nothing'} usable here, nothing to choose")
                    continue
                fitted = _fit(op, spec, _free_bytes(device), tokens, fraction=0.5)  # nothing else runs: half of free
                if fitted is None:
                    log(f"{key}: does not fit in free GPU memory, skipped")
                    continue
                entries[key] = measure(op, fitted, candidates, device, "command")
                save_entries(table_path(name), name, {key: entries[key]})  # kept if a later entry fails
                ms = entries[key]["ms"]
                times = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                log(f"{key}: {times} -> {entries[key]['order'][0]}")
    return entries


def _probe_tensors(op: str, spec: dict) -> dict:
    """Tiny GPU tensors of the workload's dtype, for the usability checks."""
    dtype = getattr(torch, spec["dtype"])
    t = lambda *shape: torch.empty(*shape, dtype=dtype, device="cuda")
    labels = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    if op in LINEAR_OPS:
        tensors = {"hidden": t(1, 1, 8), "weight": t(8, 8), "labels": labels}
        if "spa" in op:
            tensors.update(ref_hidden=t(1, 1, 8), ref_weight=t(8, 8))
        return tensors
    tensors = {"logits": t(1, 1, 8), "labels": labels}
    if "spa" in op:
        tensors["ref_logits"] = t(1, 1, 8)
    return tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--vocab", default="32000,128256")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=COMMAND_TOKENS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--show", action="store_true", help="print the table for this GPU and exit")
    p.add_argument("--clear", action="store_true", help="delete the table for this GPU and exit")
    p.add_argument("--copy-to", default="", help="also copy the table file here (a directory)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("spa_kernels.autotune: no CUDA device, nothing to measure (impl='auto' on the CPU needs no table)")
        return 1
    device = torch.device(args.device)
    name = gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    path = table_path(name)
    if args.clear:
        if os.path.exists(path):
            os.remove(path)
        clear_cache()
        print(f"removed {path}")
        return 0
    if not args.show:
        tune(ops=args.ops.split(","), dtypes=args.dtypes.split(","), vocabs=[int(v) for v in args.vocab.split(",")],
             hidden=args.hidden, tokens=args.tokens, device=device)
    clear_cache()
    table = load_table(path)
    print(f"{path}\n{json.dumps(table, indent=2, sort_keys=True)}")
    if args.copy_to and os.path.exists(path):
        os.makedirs(args.copy_to, exist_ok=True)
        with open(os.path.join(args.copy_to, os.path.basename(path)), "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
