"""sequence_logprobs forward + backward: time and peak extra memory, every implementation side by side.

    python benchmarks/bench_logprobs.py                 # the full sweep on this machine's device
    python benchmarks/bench_logprobs.py --quick         # one shape (N=8, T=512, V=32000)

Rows: "eager" is how TRL's eager path does it (log_softmax over [N, T, V] + gather); "reference" is our pure-PyTorch
implementation (impl="torch"); then every kernel usable here, with and without the in-place backward (the Triton
rows on a GPU only: on the CPU Triton runs in its interpreter, which is for tests, not timings).
"traffic_floor" is the fraction of the memory-traffic floor a row reaches: the logits read twice (forward and
backward) and the gradient written once, at the copy bandwidth the script measures on the same device first.
Writes benchmarks/results/bench_logprobs_<device>.csv and .png.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import spa_kernels as sk  # noqa: E402
from spa_kernels import _dispatch  # noqa: E402


def eager_sequence_logprobs(logits, labels, ignore_index=-100):
    """TRL's eager way: full log_softmax, gather, masked sum."""
    mask = labels != ignore_index
    lp = torch.log_softmax(logits.float() if logits.dtype != torch.float32 else logits, dim=-1)
    tok = lp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def variants(device):
    out = {"eager": lambda x, y: eager_sequence_logprobs(x, y)}
    probe = {"logits": torch.empty(1, 1, 8, device=device), "labels": torch.zeros(1, 1, dtype=torch.long,
                                                                                   device=device)}
    for impl in _dispatch.IMPLS:
        if _dispatch.unusable_reason("logprobs", impl, probe) is not None:
            continue
        if impl == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timings
        name = "reference" if impl == "torch" else impl
        out[name] = lambda x, y, impl=impl: sk.sequence_logprobs(x, y, impl=impl)
        if impl != "torch":
            out[f"{impl}+inplace"] = lambda x, y, impl=impl: sk.sequence_logprobs(_ModelOutput.apply(x), y, impl=impl,
                                                                                   inplace_backward=True)
    return out


class _ModelOutput(torch.autograd.Function):
    """Stands in for a model's output logits: a non-leaf sharing the benchmark's input buffer (no copy), which is
    what inplace_backward=True needs (a leaf's buffer is refused: the user's tensor would be overwritten)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def make_inputs(N, T, V, dtype, device):
    # filled in place, so creating them makes no temporary copy that would skew the memory baseline
    logits = torch.empty(N, T, V, dtype=dtype, device=device)
    for n in range(N):
        logits[n].normal_(0, 3)
    labels = torch.randint(0, V, (N, T), device=device)
    labels[:, : T // 8] = -100  # a prompt
    return logits.requires_grad_(), labels


def run_one(fn, logits, labels, device, reps):
    def step():
        fn(logits, labels).sum().backward()

    return _harness.measure(step, device, reps=reps, reset=lambda: setattr(logits, "grad", None))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only N=8, T=512, V=32000")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--vocab", default="32000,128256")
    p.add_argument("--tokens", default="1024,2048,4096,8192", help="N*T values (T=512)")
    _harness.add_common_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    T = 512
    shapes = [(8, 512, 32000)] if args.quick else [
        (tok // T, T, V) for V in map(int, args.vocab.split(",")) for tok in map(int, args.tokens.split(","))]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.quick:
        dtypes = [torch.float32]
    all_variants = variants(device)
    if args.only:
        all_variants = {k: v for k, v in all_variants.items() if k in args.only.split(",")}
    # rough footprint in units of the logits' size (inputs included): eager holds a float32 log-softmax and
    # the scattered gradient besides the gradient itself
    footprint = {"eager": 4.5, "reference": 3.5}
    rows = []
    print(f"device: {_harness.device_name(device)}  versions: {_harness.versions()}")
    bandwidth = _harness.copy_bytes_per_s(device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    for dtype in dtypes:
        for N, T_, V in shapes:
            nbytes = N * T_ * V * torch.tensor([], dtype=dtype).element_size()
            for name, fn in all_variants.items():
                need = nbytes * (footprint.get(name, 2.2) * (2 if dtype != torch.float32 and name in footprint
                                                              else 1))
                row = {"op": "sequence_logprobs", "impl": name, "dtype": str(dtype).replace("torch.", ""), "N": N,
                       "T": T_, "V": V, "tokens": N * T_, "grad_mb": nbytes / 2**20}
                if need > args.mem_fraction * _harness.free_memory_bytes(device):
                    print(f"skip {name} {row['dtype']} N*T={N * T_} V={V}: needs ~{need / 2**30:.1f} GiB")
                    continue
                logits, labels = make_inputs(N, T_, V, dtype, device)
                row.update(run_one(fn, logits, labels, device, args.reps))
                del logits, labels
                rows.append(row)
                print(f"{name:14s} {row['dtype']:8s} N*T={N * T_:5d} V={V:6d}  {row['ms']:9.2f} ms  "
                      f"peak extra {row['peak_extra_mb']:8.1f} MiB ({row['peak_extra_mb'] / row['grad_mb']:.2f}x grad)",
                      flush=True)
    for r in rows:  # ratios against eager at the same shape and dtype
        base = next((b for b in rows if b["impl"] == "eager" and all(b[k] == r[k] for k in ("dtype", "N", "T", "V"))),
                    None)
        r["speedup_vs_eager"] = base["ms"] / r["ms"] if base else float("nan")
        r["mem_vs_eager"] = (r["peak_extra_mb"] / base["peak_extra_mb"] if base and base["peak_extra_mb"]
                             else float("nan"))
        r["mem_vs_grad"] = r["peak_extra_mb"] / r["grad_mb"]
        r["floor_ms"] = 3 * r["grad_mb"] * 2**20 / bandwidth * 1e3  # read logits twice, write the gradient once
        r["traffic_floor"] = r["floor_ms"] / r["ms"]
    _harness.print_table(rows, ["impl", "dtype", "tokens", "V", "ms", "speedup_vs_eager", "peak_extra_mb",
                                "mem_vs_eager", "mem_vs_grad", "floor_ms", "traffic_floor"],
                         title="sequence_logprobs forward+backward")
    path = _harness.write_csv(rows, "bench_logprobs", device)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(rows, device)}")
    return rows


def plot(rows, device):
    plt = _harness.pyplot()

    groups = sorted({(r["dtype"], r["V"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 7), squeeze=False)
    for j, (dt, V) in enumerate(groups):
        sub = [r for r in rows if r["dtype"] == dt and r["V"] == V]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["tokens"], r["ms"], r["peak_extra_mb"]) for r in sub if r["impl"] == impl)
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
        axes[0][j].set_title(f"{dt}, V={V}")
        axes[0][j].set_ylabel("fwd+bwd ms")
        axes[1][j].set_ylabel("peak extra MiB")
        axes[1][j].set_xlabel("N*T tokens")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _harness.save_figure(fig, "sequence_logprobs", "bench_logprobs", device)


if __name__ == "__main__":
    main()
