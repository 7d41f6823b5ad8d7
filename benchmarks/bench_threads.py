"""Time a train-like CPU workload (the demo's 0.8M-parameter Llama: forward + backward + AdamW, batch 64 x 48
tokens) at different torch thread counts, alone and next to other busy processes, to choose `spa`'s default thread
count.

    python benchmarks/bench_threads.py --threads 1 2 --load none spin torch --steps 20

--load none: the workload alone; spin: one pure-Python busy loop per CPU next to it (other jobs); torch: one more
copy of the same workload with the same thread count next to it (two runs on one machine). Prints ms per step
(median of the steps after 3 warm-up steps) for each combination.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _workload(threads: int, steps: int, out=None) -> list[float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                         tie_word_embeddings=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (64, 48))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    if out is not None:
        out.put(times)
    return times


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(1000))


def measure(threads: int, load: str, steps: int) -> float:
    ctx = mp.get_context("spawn")
    stop, others = ctx.Event(), []
    if load == "spin":
        others = [ctx.Process(target=_spin, args=(stop,)) for _ in range(len(os.sched_getaffinity(0)))]
    elif load == "torch":
        others = [ctx.Process(target=_workload, args=(threads, steps * 3))]
    for p in others:
        p.start()
    time.sleep(1.0 if others else 0)
    try:
        times = _workload(threads, steps)
    finally:
        stop.set()
        for p in others:
            p.terminate()
            p.join()
    return 1000 * statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--load", nargs="+", default=["none", "spin", "torch"], choices=["none", "spin", "torch"])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    print(f"cpus available: {len(os.sched_getaffinity(0))}, os.cpu_count(): {os.cpu_count()}")
    for load in args.load:
        for t in args.threads:
            print(f"load={load:5s} threads={t}: {measure(t, load, args.steps):8.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
