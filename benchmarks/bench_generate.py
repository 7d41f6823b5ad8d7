"""Generation throughput of the hf backend (spa.generation.HFBackend) on the CPU: new tokens per second.

Models (randomly initialised Llamas with the demo's character tokenizer, built here; random weights rarely emit EOS,
so nearly every response runs to --max-new-tokens and every variant generates about the same number of tokens):
  demo    the `spa demo` model (spa/tasks/demo.yaml: hidden 128, 3 layers, 0.8M parameters)
  larger  hidden 512, 8 layers, intermediate 1408 (25M parameters)
Prompts: --prompts prompts of the demo task (`reverse`, 11-31 tokens with the chat template), --samples samples
each, temperature 0.7, seeded as in the generate stage.

Variants (each after one untimed warm-up call on a few prompts, median of --reps timed calls):
  sorted-b<B>     the generate stage's batching: prompts in length order, B per generate() call
  unsorted-b<B>   the same B per call in the prompts' given order (more left padding)
  no-cache-b<B>   length-sorted, KV cache off (every step recomputes the whole sequence)
  compile-b<B>    length-sorted, the model's forward through torch.compile(dynamic=True); its first call (the
                  compilation) is reported separately as compile_s
Threads: --threads (default 1) torch intra-op threads, set before anything runs and printed.

    python benchmarks/bench_generate.py [--models demo,larger] [--threads 1] [--only sorted-b64,compile-b64]
Writes benchmarks/results/bench_generate_cpu.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._harness import device_name, print_table, write_csv  # noqa: E402

MODELS = {
    "demo": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True),
    "larger": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, max_position_embeddings=128, tie_word_embeddings=True),
}


def build(name: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         **MODELS[name]))
    return model.eval()


def prompts_of_demo_task(tok, n: int) -> list[list[int]]:
    from spa.data import PromptEncoder
    from spa.tasks import reverse

    rows = reverse.build(n_sft=0, n_prefs=n, n_eval_prompts=0, n_eval_pairs=0, seed=0)["prefs"]
    enc = PromptEncoder(tok, 10 ** 6)
    return [enc.encode([{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"])
            for r in rows[:n]]


def run_variant(model, tok, prompts, variant: str, args) -> dict:
    from spa.generation import HFBackend, SamplingParams

    kind, batch = variant.rsplit("-b", 1)
    batch = int(batch)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens)
    backend = HFBackend(model, tok.pad_token_id, tok.eos_token_id, batch, use_cache=kind != "no-cache",
                        compile=kind == "compile")

    def call(ps):
        if kind == "unsorted":  # one generate() per batch of the given order: the backend sorts within it only
            out = []
            for s in range(0, len(ps), batch):
                out += backend.generate(ps[s:s + batch], args.samples, params, (0, s))
            return out
        return backend.generate(ps, args.samples, params, (0,))

    t0 = time.perf_counter()
    call(prompts[:min(len(prompts), batch)])  # warm-up (for compile: the compilation)
    first_s = time.perf_counter() - t0
    times, tokens = [], 0
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = call(prompts)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(t) for rows in out for t in rows)
    if kind == "compile":
        torch._dynamo.reset()
        model.forward = type(model).forward.__get__(model)  # undo the compiled forward for the next variant
    median = statistics.median(times)
    return {"variant": variant, "batch": batch, "new_tokens": tokens, "seconds": median,
            "tokens_per_s": tokens / median, "compile_s": first_s if kind == "compile" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,larger")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="sorted-b1,sorted-b16,sorted-b64,unsorted-b16,no-cache-b64,compile-b64",
                   help="comma-separated variants (kind-b<batch>, kind in sorted, unsorted, no-cache, compile)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from spa.tasks.chartok import char_tokenizer

    tok = char_tokenizer()
    prompts = prompts_of_demo_task(tok, args.prompts)
    device = torch.device("cpu")
    print(f"{device_name(device)}; {args.prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens) x {args.samples} samples, max_new_tokens {args.max_new_tokens}, {args.threads} torch thread(s)")
    rows = []
    for name in args.models.split(","):
        model = build(name, tok)
        params = sum(p.numel() for p in model.parameters())
        for variant in args.only.split(","):
            r = run_variant(model, tok, prompts, variant, args)
            rows.append({"model": name, "params_M": params / 1e6, "threads": args.threads, **r})
            print_table(rows[-1:], ["model", "variant", "new_tokens", "seconds", "tokens_per_s", "compile_s"])
    print_table(rows, ["model", "params_M", "variant", "new_tokens", "seconds", "tokens_per_s", "compile_s"],
                "generation throughput (median of timed calls)")
    print(write_csv(rows, "bench_generate", device))


if __name__ == "__main__":
    main()
