"""One TRL DPO training step (forward + backward of policy and reference, no optimizer step) on a small random
Llama: TRL's own DPOTrainer vs TRL + Liger (`use_liger_kernel=True`) vs the spa_kernels drop-in
(spa_kernels.integrations.trl.DPOTrainer), time and peak memory side by side.

    python benchmarks/bench_trl_step.py                  # the sweep for this machine's device
    python benchmarks/bench_trl_step.py --quick          # V=32000, a few hundred tokens: proves it runs
    python benchmarks/bench_trl_step.py --vocab 32000,128256 --pairs 4 --prompt 512 --completion 512

Variants: "trl" (TRL 1.16's own DPOTrainer, which always runs its fused lm_head: `add_fused_lm_head`, i.e.
trl.kernels.ChunkedLogProbFunction over vocabulary tiles, Triton on a GPU and torch ops on the CPU; the lm_head
column confirms the patched forward was used), "trl+liger" (TRL with use_liger_kernel=True: in TRL 1.16 this swaps
in Liger's Triton RMSNorm / SwiGLU / RoPE but keeps TRL's own fused loss, as Liger's fused linear cross-entropy would
replace the forward TRL patches; needs a GPU, listed as n/a elsewhere), "spa" (the drop-in, with TRL's entropy /
logits / token-accuracy metrics: one extra no-grad lm_head pass) and "spa-lean" (the drop-in with
token_metrics=False). Every variant runs the same model (same seed) on the same batch. The sweep is over the
vocabulary size (V >= 32000) at a fixed token count; the backbone is deliberately small so the lm_head + loss
dominates. Writes benchmarks/results/bench_trl_step_<device>.csv (+ .png).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # noqa: E402

VARIANTS = ("trl", "trl+liger", "spa", "spa-lean")


def unavailable_reason(variant: str, device: torch.device) -> str | None:
    if variant == "trl+liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
        if device.type != "cuda":
            return "Liger's kernels are Triton kernels and need a GPU"
    return None


def preference_rows(n: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    """Random printable strings: with the character tokenizer, one character = one token."""
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(k))
    return [{"prompt": text(prompt), "chosen": text(completion), "rejected": text(completion)} for _ in range(n)]


def make_trainer(variant, vocab, opts, device, output_dir):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from spa_kernels.integrations.trl import DPOTrainer
    from tests.toy import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    dtype = getattr(torch, opts.dtype)
    policy = tiny_llama(vocab, hidden_size=opts.hidden, layers=opts.layers, heads=max(1, opts.hidden // 64),
                        dtype=dtype).to(device)
    ref = copy.deepcopy(policy)
    config = DPOConfig(output_dir=output_dir, per_device_train_batch_size=opts.pairs, max_length=None,
                       report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                       use_cpu=device.type == "cpu", use_liger_kernel=variant == "trl+liger",
                       gradient_checkpointing=False)
    data = Dataset.from_list(preference_rows(opts.pairs, opts.prompt, opts.completion))
    kwargs = dict(model=policy, ref_model=ref, args=config, processing_class=tokenizer, train_dataset=data)
    if variant.startswith("spa"):
        return DPOTrainer(**kwargs, token_metrics=variant == "spa")
    return TRLDPOTrainer(**kwargs)


def run_variant(variant, vocab, opts, device):
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(variant, vocab, opts, device, output_dir)
        if variant == "trl+liger":  # Trainer.train applies Liger's kernels when training starts; do it here
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which is not used here
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        tokens = int(inputs["attention_mask"].sum())
        forward = getattr(getattr(model.forward, "__func__", None), "__code__", None)
        lm_head = ("spa drop-in" if variant.startswith("spa") else
                   "trl fused" if forward is not None and forward.co_name == "_fused_forward" else "logits")

        def step():
            trainer.training_step(model, inputs)

        def reset():
            model.zero_grad(set_to_none=True)
            trainer._metrics["train"].clear()

        return {**_harness.measure(step, device, reps=opts.reps, reset=reset), "tokens": tokens, "lm_head": lm_head}


def run_isolated(variant, vocab, opts, device):
    """run_variant in a fresh process: a process's peak-RSS reading is only clean if no earlier variant has left
    freed-but-mapped heap behind (glibc keeps it after raising its mmap threshold), and CUDA caches likewise."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_variant, variant, vocab, opts, device).result()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="V=32000, 2 pairs of 64+64 tokens, 1 rep")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", default=None, help="comma-separated vocabulary sizes (default: 32000,128256 on a "
                                                  "GPU, 32000,65536 on the CPU)")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default: 8 GPU, 2 CPU)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: 512 GPU, 128 CPU)")
    p.add_argument("--completion", type=int, default=None, help="completion tokens (default: 512 GPU, 128 CPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 1024 GPU, 256 CPU)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 GPU, float32 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 3; 1 with --quick)")
    p.add_argument("--only", default="", help="comma-separated variants among " + ",".join(VARIANTS))
    p.add_argument("--no-isolate", action="store_true", help="measure every variant in this process (faster, but "
                                                                 "later variants' memory readings are then too low)")
    p.add_argument("--no-plot", action="store_true")
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    gpu = device.type == "cuda"
    if opts.quick:
        defaults = dict(vocab="32000", pairs=2, prompt=64, completion=64, hidden=64, reps=1)
    else:
        defaults = dict(vocab="32000,128256" if gpu else "32000,65536", pairs=8 if gpu else 2,
                        prompt=512 if gpu else 128, completion=512 if gpu else 128, hidden=1024 if gpu else 256,
                        reps=3)
    defaults["dtype"] = "bfloat16" if gpu else "float32"
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    variants = [v for v in VARIANTS if not opts.only or v in opts.only.split(",")]

    logging.getLogger("spa_kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    print(f"device: {_harness.device_name(device)}  versions: {_harness.versions()}")
    rows = []
    for vocab in map(int, opts.vocab.split(",")):
        for variant in variants:
            row = {"bench": "trl_dpo_step", "variant": variant, "V": vocab, "H": opts.hidden, "layers": opts.layers,
                   "pairs": opts.pairs, "prompt": opts.prompt, "completion": opts.completion, "dtype": opts.dtype}
            reason = unavailable_reason(variant, device)
            if reason:
                row["note"] = f"n/a on {device.type}: {reason}"
                rows.append(row)
                print(f"{variant:10s} V={vocab:6d}  {row['note']}")
                continue
            row.update((run_variant if opts.no_isolate else run_isolated)(variant, vocab, opts, device))
            rows.append(row)
            print(f"{variant:10s} V={vocab:6d}  {row['ms']:9.1f} ms  peak extra {row['peak_extra_mb']:8.1f} MiB",
                  flush=True)
    measured = [r for r in rows if "ms" in r]
    for r in measured:  # ratios against TRL's own path at the same V
        base = next((b for b in measured if b["variant"] == "trl" and b["V"] == r["V"]), None)
        r["time_vs_trl"] = r["ms"] / base["ms"] if base else float("nan")
        r["mem_vs_trl"] = r["peak_extra_mb"] / base["peak_extra_mb"] if base and base["peak_extra_mb"] else float("nan")
    _harness.print_table(rows, ["variant", "lm_head", "V", "tokens", "ms", "time_vs_trl", "peak_extra_mb",
                                "mem_vs_trl", "note"],
                         title=f"TRL DPO step (H={opts.hidden}, {opts.layers} layers, {opts.dtype})")
    path = _harness.write_csv(rows, "bench_trl_step", device)
    print(f"wrote {path}")
    if not opts.no_plot and measured:
        print(f"wrote {plot(measured, device)}")
    return rows


def plot(rows, device):
    plt = _harness.pyplot()

    vocabs = sorted({r["V"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        for ax, key in zip(axes, ("ms", "peak_extra_mb")):
            xs = [j + i * width for j, V in enumerate(vocabs) if any(r["V"] == V and r["variant"] == variant
                                                                      for r in rows)]
            ys = [r[key] for V in vocabs for r in rows if r["V"] == V and r["variant"] == variant]
            ax.bar(xs, ys, width, label=variant)
    for ax, label in zip(axes, ("step ms", "peak extra MiB")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(vocabs))], [f"V={V}" for V in vocabs])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    return _harness.save_figure(fig, "TRL DPO step", "bench_trl_step", device)


if __name__ == "__main__":
    main()
