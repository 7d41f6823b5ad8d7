"""Shared benchmark plumbing: timing, peak memory, machine description, CSV + PNG output.

Timing: on a GPU, triton.testing.do_bench (median and 20/80% quantiles); on the CPU, the median of repeated
wall-clock runs. Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs before each measurement, after glibc's malloc_trim has handed freed
heap pages back, so the peak tracks the tensors the measured call allocates). "peak_extra" excludes the inputs that
exist before the measured call; run each variant in its own process (the benchmarks do so on the CPU) so that no
earlier variant's heap is counted or reused.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag(device: torch.device) -> str:
    """Short name for result files: cpu, h100, h200, a100, ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "trl", "liger_kernel", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): hands the heap's free pages back to the OS, so the resident set before a measured
    call holds no memory a previous call freed (glibc raises its mmap threshold after freeing large blocks, up to
    32 MiB, so such blocks then come from the heap and would otherwise stay resident and be reused unseen)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, device: torch.device, reps: int = 5, warmup: int = 1, reset=None) -> dict:
    """Runs fn (forward + backward, inputs created beforehand) and returns its time and peak extra memory.
    reset() (e.g. dropping .grad of the inputs) runs before each call, outside the memory window."""
    reset = reset or (lambda: None)
    gc.collect()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        reset()
        fn()  # compile / autotune outside the memory window
        reset()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        reset()
        ms, p20, p80 = triton.testing.do_bench(lambda: (reset(), fn()), quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"ms": ms, "ms_p20": p20, "ms_p80": p80, "peak_extra_mb": peak / 2**20}
    for _ in range(warmup):
        reset()
        fn()
    reset()
    gc.collect()
    peak = float("nan")
    if _reset_cpu_peak():
        base = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM") - base
    times, cpu_times = [], []
    for _ in range(reps):
        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    # cpu_ms: the process's CPU time per call; on a machine shared with other jobs it moves less than the wall clock
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8),
            "cpu_ms": statistics.median(cpu_times), "peak_extra_mb": peak / 2**20}


def add_common_args(p, variants: str = "comma-separated variant names to run") -> None:
    """The options every benchmark takes: --reps, --only, --mem-fraction, --no-plot."""
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="", help=variants)
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="skip a variant whose estimated footprint exceeds this fraction of free memory")
    p.add_argument("--no-plot", action="store_true")


def write_csv(rows: list[dict], name: str, device: torch.device) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}_{device_tag(device)}.csv")
    meta = {"device": device_name(device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **versions()}
    keys = list(dict.fromkeys(k for r in rows for k in r)) + list(meta)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    return path


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _status_kb("MemAvailable") if False else int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _time_ms(fn, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of fn() (do_bench on a GPU, wall clock after one warm-up run on the CPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Dense matmul rate this device reaches with torch.mm on [n, n] x [n, n] of `dtype` (the floor's yardstick)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = _time_ms(lambda: torch.mm(a, b), device)
    return 2 * n ** 3 / (ms * 1e-3)


def copy_bytes_per_s(device: torch.device, nbytes: int | None = None) -> float:
    """Memory bandwidth of a large device copy (bytes read + bytes written per second)."""
    nbytes = nbytes or (2 * 2**30 if device.type == "cuda" else 256 * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, title: str, name: str, device: torch.device) -> str:
    """Titles the figure with the device, writes results/<name>_<device tag>.png and returns its path."""
    fig.suptitle(f"{title} on {device_name(device)}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{name}_{device_tag(device)}.png")
    fig.savefig(path, dpi=110)
    return path
