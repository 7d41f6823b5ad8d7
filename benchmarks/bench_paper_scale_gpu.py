"""Per-stage throughput and peak GPU memory of spa's stages for a 7B model, the numbers docs/recipe-paper-scale.md
extrapolates from.

A randomly initialised model with Mistral-7B's shapes (hidden 4096, 32 layers, MLP 14336, 32 query / 8 KV heads,
vocabulary 32000; the weights' values do not change the cost) in bfloat16 on one GPU, with random token ids:
  generate  model.generate as the generate stage calls it (64 prompts x 2 samples, temperature 0.7, prompts of
            --prompt-len tokens, exactly --new-tokens new tokens: min_new_tokens = max_new_tokens)
  score     spa.scoring.score_sequences (the judge, reference precomputation and validation), batch 16
  train     one optimizer step of the train stage's loss (spa_kernels.integrations.hf, the fused head) on a
            per-device batch of --pairs pairs of --seq-len tokens each, gradient checkpointing on:
              full       all weights, bf16 weights + AdamW states (no fp32 master copy), reference precomputed
              full+dnd   the same with SPA's de-coupled noise detection: a second full model gives the reference
                         hidden states every step
              lora       LoRA r=16 on every linear layer of the blocks, reference precomputed
              lora+dnd   the reference is the frozen "ref" adapter on the same base weights (spa.models.AdapterView)
Times are the median of --reps steps after one warm-up (CUDA-synchronised wall clock); memory is
torch.cuda.max_memory_allocated over the measured steps.

    python benchmarks/bench_paper_scale_gpu.py --out benchmarks/results/bench_paper_scale_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_paper_scale_gpu.json"))
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence (train.max_length)")
    p.add_argument("--pairs", type=int, default=4, help="pairs per device per step (train.per_device_batch_size)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--impl", default="auto", help="spa_kernels implementation")
    p.add_argument("--only", default="", help="comma-separated: generate,score,full,full+dnd,lora,lora+dnd")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 on the CPU (checks the script)")
    args = p.parse_args()
    shapes = dict(MISTRAL_7B)
    if args.tiny:
        shapes.update(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    want = set(args.only.split(",")) if args.only else {"generate", "score", "full", "full+dnd", "lora", "lora+dnd"}

    from transformers import LlamaConfig, LlamaForCausalLM  # Mistral-7B without sliding window = Llama shapes

    from spa.scoring import pad_sequences, score_sequences
    from spa_kernels.integrations.hf import extrapolated_preference_logps, preference_loss_from_model

    dev = torch.device("cpu" if args.tiny else "cuda")
    results = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(dev), "torch": torch.__version__,
               "model": "tiny" if args.tiny else "Mistral-7B shapes", "args": vars(args)}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    def new_model(seed: int):
        torch.manual_seed(seed)
        with dev:
            m = LlamaForCausalLM(LlamaConfig(**shapes)).to(torch.bfloat16)
        return m

    t0 = time.perf_counter()
    model = new_model(0)
    results["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    results["init_seconds"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    V = shapes["vocab_size"]

    def record(name, fn):
        if name not in want:
            return
        try:
            reset_peak()
            results[name] = fn()
        except Exception as e:  # noqa: BLE001  (record and go on: the other stages still get measured)
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps(results[name])[:400], flush=True)
        save()

    @torch.inference_mode()
    def generate():
        model.eval()
        ids = torch.randint(3, V, (64, args.prompt_len), generator=g).to(dev)
        kw = dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, num_return_sequences=2, pad_token_id=0,
                  eos_token_id=2, attention_mask=torch.ones_like(ids))
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        times = sync_time(lambda: model.generate(ids, max_new_tokens=args.new_tokens,
                                                 min_new_tokens=args.new_tokens, **kw), 1)
        new = 128 * args.new_tokens
        return {"prompts": 64, "samples": 2, "new_tokens": new, "seconds": times[0],
                "new_tokens_per_s": new / times[0], "peak_gib": peak_gib()}

    def score():
        model.eval()
        n, resp = 64, args.seq_len - args.prompt_len
        items = [(torch.randint(3, V, (args.prompt_len,), generator=g).tolist(),
                  torch.randint(3, V, (resp,), generator=g).tolist()) for _ in range(n)]
        score_sequences(model, items[:16], 0, 16, args.impl)
        times = sync_time(lambda: score_sequences(model, items, 0, 16, args.impl), args.reps)
        s = statistics.median(times)
        return {"sequences": n, "tokens_per_sequence": args.seq_len, "seconds": s,
                "tokens_per_s": n * args.seq_len / s, "sequences_per_s": n / s, "peak_gib": peak_gib()}

    def batch():
        resp = args.seq_len - args.prompt_len
        items = [(torch.randint(3, V, (args.prompt_len,), generator=g).tolist(),
                  torch.randint(3, V, (resp,), generator=g).tolist()) for _ in range(2 * args.pairs)]
        b = pad_sequences(items, 0, dev)
        b.pop("response_mask")
        b["ref_chosen_logps"] = torch.full((args.pairs,), -500.0, device=dev)
        b["ref_rejected_logps"] = torch.full((args.pairs,), -500.0, device=dev)
        return b

    def train_step(policy, params, ref=None):
        opt = torch.optim.AdamW(params, lr=1e-6)
        b = batch()

        def step():
            if ref is None:
                loss = preference_loss_from_model(policy, b, beta=0.1, impl=args.impl).loss
            else:
                out = extrapolated_preference_logps(policy, ref, b, lam=0.5, impl=args.impl)
                pc, pr = out.logps.chunk(2)
                rc, rr = out.ref_logps.chunk(2)
                from spa_kernels import preference_loss

                loss = preference_loss(pc, pr, rc, rr, beta=0.1).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        policy.train()
        step()  # warm-up (optimizer states allocated)
        reset_peak()
        times = sync_time(step, args.reps)
        s = statistics.median(times)
        tokens = 2 * args.pairs * args.seq_len
        return {"pairs_per_step": args.pairs, "tokens_per_step": tokens, "seconds_per_step": s,
                "tokens_per_s": tokens / s, "pairs_per_s": args.pairs / s, "peak_gib": peak_gib(),
                "trainable_params_m": sum(p.numel() for p in params) / 1e6}

    record("generate", generate)
    record("score", score)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    record("full", lambda: train_step(model, [p for p in model.parameters()]))
    if "full+dnd" in want:
        ref = new_model(1).eval().requires_grad_(False)
        record("full+dnd", lambda: train_step(model, [p for p in model.parameters()], ref))
        del ref
    for p_ in model.parameters():
        p_.grad = None
    reset_peak()

    from peft import LoraConfig, get_peft_model

    from spa.models import REFERENCE_ADAPTER, AdapterView

    model.requires_grad_(False)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR,
                                            task_type="CAUSAL_LM"))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    record("lora", lambda: train_step(lora, trainable))
    if "lora+dnd" in want:
        lora.add_adapter(REFERENCE_ADAPTER, LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR,
                                                      task_type="CAUSAL_LM"))
        lora.set_adapter("default")
        record("lora+dnd", lambda: train_step(lora, trainable, AdapterView(lora, REFERENCE_ADAPTER)))
    results["total_seconds"] = time.perf_counter() - t0
    save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
