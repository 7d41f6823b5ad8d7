"""The DPO loss from hidden states (policy and reference lm_head in the same call): forward + backward time and peak
extra memory, every way of computing it side by side in one run.

    python benchmarks/bench_fused_linear_dpo.py           # the sweep for this machine's device
    python benchmarks/bench_fused_linear_dpo.py --quick   # only the target point (GPU: B=8, T=1024, H=4096, V=128256)
    python benchmarks/bench_fused_linear_dpo.py --pairs 2 --seq 256 --hidden 512 --vocab 8000 --dtype float32
    python benchmarks/bench_fused_linear_dpo.py --shapes 2x256x512x32000,4x512x1024x32000   # BxTxHxV points

Rows (each: per-sequence log-probs of chosen and rejected under the policy, with gradient to hidden and the lm_head
weight, and under the reference without gradient, then the sigmoid DPO loss, beta=0.1):
  eager          hidden @ weight.T -> [2B, T, V] logits -> float32 log_softmax -> gather (TRL's eager path)
  trl            TRL's fused lm_head log-probs (trl.kernels.ChunkedLogProbFunction, what
                 `model(..., fused_lm_head=True)` and so TRL 1.16's DPOTrainer run: cuBLAS vocabulary tiles + a
                 Triton online-LSE fold on a GPU, the same tiles with torch ops on the CPU), scored tokens only
  liger          Liger-Kernel's LigerFusedLinearDPOLoss (pure PyTorch chunked over pairs, torch.compile'd: its
                 default); on the CPU also liger-eager (compiled=False)
  cce            Cut Cross-Entropy's linear_cross_entropy(..., reduction="none") (its Triton kernels: GPU only;
                 optional, `pip install cut-cross-entropy`)
  spa-<impl>     ours: spa_kernels.FusedLinearPreferenceLoss(impl=...) for every usable backend (triton and cuda on
                 a GPU, cpu, and "reference" = the pure-PyTorch impl="torch"): the gradient computed in the forward
                 over the backend's log-prob kernels (3 matmuls per policy token)
  spa-<impl>-logps  the same with grad_in_forward=False: per-sequence log-probs, then a backward that rebuilds the
                 logits (on a GPU with triton: the fused matmul + log-sum-exp kernels)
Columns: ms (wall clock; on the CPU also cpu_ms, the process's CPU time per call), peak extra MiB (beyond the
inputs; on the CPU each row runs in a fresh process, see _harness), speed and memory ratios against liger and eager
at the same shape, mem_floor_mb: the memory no chunked method can go below, the weight gradient + the hidden
gradient + one chunk of logits (spa's chunk for this device and vocabulary, chunk_size_for), and peak_vs_floor = peak
extra / mem_floor_mb; matmul_floor: the fraction of the GEMM floor reached, 8 * M * H * V flops (policy forward,
reference forward, the two backward GEMMs; M = tokens with a label, the prompt excluded) at the torch.mm rate the
script measures first on the same device and dtype. A row that cannot run here is listed with the reason.
Writes benchmarks/results/bench_fused_linear_dpo_<device>.csv and .png.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # noqa: E402

import spa_kernels as sk  # noqa: E402
from spa_kernels import _dispatch  # noqa: E402

BETA = 0.1
GPU_TARGET = (8, 1024, 4096, 128256)  # pairs, sequence length, hidden size, vocabulary


def dpo_from_sequence_logps(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    return sk.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA).loss


def per_sequence(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token log-probs of the scored positions (mask order) -> [rows] sums."""
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device).index_add(0, rows, token_logps.float())


def eager_logps(hidden, weight, labels):
    mask = labels != -100
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    tok = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def trl_logps(hidden, weight, labels):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    tok = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                       None, 1.0, ("log_probs",))[0]
    return per_sequence(tok, mask)


def cce_logps(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    mask = labels != -100
    nll = linear_cross_entropy(hidden[mask], weight, labels[mask], reduction="none")
    return per_sequence(-nll, mask)


def logps_variant(logps_fn):
    def loss(hidden, weight, ref_hidden, ref_weight, labels):
        with torch.no_grad():
            ref = logps_fn(ref_hidden, ref_weight, labels)
        return dpo_from_sequence_logps(logps_fn(hidden, weight, labels), ref)

    return loss


def liger_variant(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=compiled, use_ref_model=True)

    def loss(hidden, weight, ref_hidden, ref_weight, labels):
        out = loss_fn(weight, hidden, labels, None, ref_hidden, ref_weight)
        return out[0] if isinstance(out, tuple) else out

    return loss


def spa_variant(impl, grad_in_forward=True):
    loss_fn = sk.FusedLinearPreferenceLoss(beta=BETA, loss_type="sigmoid", impl=impl, grad_in_forward=grad_in_forward)

    def loss(hidden, weight, ref_hidden, ref_weight, labels):
        return loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight).loss

    return loss


def variants(device) -> tuple[dict, dict]:
    """(name -> loss(hidden, weight, ref_hidden, ref_weight, labels), name -> why that row cannot run here)."""
    out, skipped = {"eager": logps_variant(eager_logps)}, {}
    try:
        import trl.kernels  # noqa: F401
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: F401

        out["trl"] = logps_variant(trl_logps)
    except ImportError as e:
        skipped["trl"] = f"TRL's fused lm_head is not importable ({e})"
    try:
        out["liger"] = liger_variant(compiled=True)
        if device.type != "cuda":
            out["liger-eager"] = liger_variant(compiled=False)
    except ImportError as e:
        skipped["liger"] = f"liger-kernel is not installed ({e})"
    if device.type == "cuda":
        try:
            import cut_cross_entropy  # noqa: F401

            out["cce"] = logps_variant(cce_logps)
        except ImportError:
            skipped["cce"] = "not installed (pip install cut-cross-entropy)"
    else:
        skipped["cce"] = "its kernels are Triton kernels and need a GPU"
    probe = {"hidden": torch.empty(1, 1, 8, device=device), "weight": torch.empty(4, 8, device=device),
             "bias": None, "labels": torch.zeros(1, 1, dtype=torch.long, device=device)}
    for impl in _dispatch.IMPLS:
        reason = _dispatch.unusable_reason("linear_logprobs", impl, probe)
        if reason is None and impl == "triton" and device.type != "cuda":
            reason = "the Triton interpreter is for tests, not timings"
        name = f"spa-{'reference' if impl == 'torch' else impl}"
        if reason is not None:
            skipped[name] = reason
            continue
        out[name] = spa_variant(impl)
        if impl in ("triton", "cuda", "cpu"):  # the log-probs path: forward, then a backward that rebuilds logits
            out[f"{name}-logps"] = spa_variant(impl, grad_in_forward=False)
    return out, skipped


@functools.cache
def cached_variants(device_name: str) -> dict:
    """variants() once per process: the compiled Liger loss then compiles once, not once per row."""
    return variants(torch.device(device_name))[0]


def make_inputs(B, T, H, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2 * B, T, H, device=device, generator=g).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(2 * B, T, H, device=device, generator=g)).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / H ** 0.5).to(dtype)
    ref_weight = (weight.float() + 0.01 * torch.randn(V, H, device=device, generator=g) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), device=device, generator=g)
    labels[:, : T // 8] = -100  # the prompt
    return hidden.requires_grad_(), weight.requires_grad_(), ref_hidden, ref_weight, labels


def memory_floor_mb(B, T, H, V, dtype, device) -> float:
    """Weight gradient + hidden gradient + one chunk of logits (spa's chunk_size_for on this device), in MiB."""
    from spa_kernels.ops.linear_logprobs.chunked import chunk_size_for

    elem = torch.empty((), dtype=dtype).element_size()
    chunk = chunk_size_for(2 * B * T, V, dtype, device)
    return (V * H + 2 * B * T * H + chunk * V) * elem / 2**20


def measure_row(name, B, T, H, V, dtype_name, device_name, reps, mem_fraction) -> dict:
    """One variant at one shape: loss, time, peak extra memory (or "note": why it was skipped)."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    fn = cached_variants(device_name)[name]
    elem = torch.tensor([], dtype=dtype).element_size()
    logits_bytes = 2 * B * T * V * elem
    # eager holds the logits, a float32 log-softmax and its gradient; the fused rows hold tiles
    need = logits_bytes * (1 + 2 * 4 / elem) if name == "eager" else logits_bytes / 4
    if need > mem_fraction * _harness.free_memory_bytes(device):
        return {"note": f"needs ~{need / 2**30:.1f} GiB"}
    inputs = make_inputs(B, T, H, V, dtype, device)
    hidden, weight, _, _, labels = inputs

    def reset():
        hidden.grad = weight.grad = None

    def step():
        fn(*inputs).backward()

    reset()
    row = {"tokens": int((labels != -100).sum()), "loss": float(fn(*inputs).detach())}
    row.update(_harness.measure(step, device, reps=reps, reset=reset))
    return row


def measure_isolated(*args) -> dict:
    """measure_row in a fresh process: its peak-RSS reading then holds no earlier variant's heap (see _harness)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_row, *args).result()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--quick", action="store_true", help="only the target point")
    p.add_argument("--pairs", default="2,8" if on_gpu else "2", help="B values (2B sequences)")
    p.add_argument("--seq", default="512,2048" if on_gpu else "64", help="T values")
    p.add_argument("--hidden", type=int, default=4096 if on_gpu else 256)
    p.add_argument("--vocab", default="32000,128256" if on_gpu else "4096")
    p.add_argument("--shapes", default="", help="explicit BxTxHxV points, comma-separated (replaces --pairs, "
                                                "--seq, --hidden, --vocab)")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="each row in a fresh process (auto: on the CPU, where peak RSS needs it)")
    _harness.add_common_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(B, T, args.hidden, V) for V in map(int, args.vocab.split(","))
                  for B in map(int, args.pairs.split(",")) for T in map(int, args.seq.split(","))]
    target = GPU_TARGET if device.type == "cuda" else shapes[-1]
    shapes = [target] if args.quick else shapes + ([target] if target not in shapes else [])
    all_variants, skipped = variants(device)
    only = set(args.only.split(",")) if args.only else None
    names = [n for n in all_variants if only is None or n in only]
    skipped = {n: r for n, r in skipped.items() if only is None or n in only}
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type != "cuda")
    run = measure_isolated if isolate else measure_row
    print(f"device: {_harness.device_name(device)}  versions: {_harness.versions()}")
    flops_per_s = _harness.matmul_flops_per_s(device, dtype)
    print(f"torch.mm {args.dtype}: {flops_per_s / 1e9:.1f} GFLOP/s")
    rows = []
    for B, T, H, V in shapes:
        floor = memory_floor_mb(B, T, H, V, dtype, device)
        for name in names + list(skipped):
            row = {"impl": name, "dtype": args.dtype, "B": B, "T": T, "H": H, "V": V, "mem_floor_mb": floor}
            if name in skipped:
                row["note"] = f"n/a on {device.type}: {skipped[name]}"
            else:
                try:
                    row.update(run(name, B, T, H, V, args.dtype, args.device, args.reps, args.mem_fraction))
                except Exception as e:  # noqa: BLE001 - a peer library failing on a shape is a row, not a crash
                    row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            if "ms" not in row:
                print(f"{name:14s} B={B} T={T:5d} H={H} V={V:6d}  {row['note']}", flush=True)
                continue
            row["matmul_floor"] = 8 * row["tokens"] * H * V / flops_per_s * 1e3 / row["ms"]
            row["peak_vs_floor"] = row["peak_extra_mb"] / floor
            print(f"{name:14s} B={B} T={T:5d} H={H} V={V:6d}  {row['ms']:9.2f} ms  peak extra "
                  f"{row['peak_extra_mb']:8.1f} MiB  loss {row['loss']:.5f}", flush=True)
    same = lambda a, b: all(a[k] == b[k] for k in ("B", "T", "H", "V"))
    nan = float("nan")
    for r in rows:
        if "ms" not in r:
            continue
        for base_name in ("liger", "eager"):
            base = next((b for b in rows if b["impl"] == base_name and same(b, r) and "ms" in b), None)
            r[f"speedup_vs_{base_name}"] = base["ms"] / r["ms"] if base else nan
            r[f"mem_vs_{base_name}"] = (r["peak_extra_mb"] / base["peak_extra_mb"]
                                        if base and base["peak_extra_mb"] else nan)
            if device.type != "cuda":
                r[f"cpu_speedup_vs_{base_name}"] = base["cpu_ms"] / r["cpu_ms"] if base else nan
    columns = ["impl", "B", "T", "H", "V", "ms"] + (["cpu_ms"] if device.type != "cuda" else []) + [
        "peak_extra_mb", "mem_floor_mb", "peak_vs_floor", "speedup_vs_liger", "mem_vs_liger", "speedup_vs_eager",
        "mem_vs_eager", "matmul_floor", "loss", "note"]
    _harness.print_table(rows, columns, title=f"DPO loss from hidden states, forward+backward, {args.dtype}")
    path = _harness.write_csv(rows, "bench_fused_linear_dpo", device)
    print(f"wrote {path}")
    if not args.no_plot and any("ms" in r for r in rows):
        print(f"wrote {plot([r for r in rows if 'ms' in r], device)}")
    return rows


def plot(rows, device):
    plt = _harness.pyplot()

    shapes = list(dict.fromkeys((r["B"], r["T"], r["V"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.6 * len(shapes) * len(impls) / 3), 7), squeeze=False)
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        for ax, key in ((axes[0][0], "ms"), (axes[1][0], "peak_extra_mb")):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                r = next((r for r in rows if r["impl"] == impl and (r["B"], r["T"], r["V"]) == s), None)
                if r is not None:
                    xs.append(i + k * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=impl)
    for ax, label in ((axes[0][0], "fwd+bwd ms"), (axes[1][0], "peak extra MiB")):
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels([f"B={b} T={t}\nV={v}" for b, t, v in shapes], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8, ncol=min(4, len(impls)))
    return _harness.save_figure(fig, "DPO loss from hidden states", "bench_fused_linear_dpo", device)


if __name__ == "__main__":
    main()
