"""Peak memory of the train stage with LoRA (model.peft) vs full fine-tuning, on the CPU.

For each model (the demo's 0.8M-parameter Llama, and a larger randomly initialised Llama) and each mode (full,
lora), two train stages of a run are measured, each in a fresh process so that peaks do not mix:
  iteration 0  DPO on the seed: reference log-probs precomputed (full: a separate reference model, freed before the
               policy is loaded; LoRA: the policy with its adapter disabled), then training
  iteration 1  SPA with de-coupled noise detection: the reference pi_0 gives hidden states at every step (full: a
               second full model kept in memory; LoRA: iteration 0's adapter loaded again, frozen, on the same base)
Peak memory = the process's peak resident set (VmHWM from /proc/self/status, reset through /proc/self/clear_refs
after the imports and the data are ready), minus the resident set at that point ("stage peak"); the absolute
peak is reported too. Weights are float32, AdamW (transformers' default), no gradient checkpointing.

    python benchmarks/bench_peft_memory.py                      # both models, table + CSV
    python benchmarks/bench_peft_memory.py --hidden 512 --layers 2 --steps 2

Writes benchmarks/results/bench_peft_memory_cpu.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DEMO = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True}


def larger(hidden: int, layers: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": int(hidden * 2.75) // 64 * 64, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "max_position_embeddings": 128,
            "tie_word_embeddings": False}


def settings(folder: str, model_dir: str, prefs: str, mode: str, pairs: int, batch: int) -> dict:
    return {
        "output_dir": os.path.join(folder, f"run_{mode}"),
        "seed": 0,
        "model": {"name_or_path": model_dir, "device": "cpu", "peft": dict(LORA) if mode == "lora" else None},
        "data": {"seed": prefs, "seed_size": pairs, "validation_size": 0,
                 "iteration_prompts": [8], "max_prompt_length": 32},
        "train": {"learning_rate": 1e-4, "seed_epochs": 1, "epochs": 1, "batch_size": batch, "max_length": 48,
                  "save_steps": 10_000, "logging_steps": 1},
        "loop": {"iterations": 1},
    }


def worker(args) -> None:
    """One train stage in this process; prints a JSON line with its memory and time."""
    from benchmarks._harness import _reset_cpu_peak, _status_kb
    from spa import Config
    from spa.cli import set_threads
    from spa.io import Layout, atomic_write_jsonl, read_jsonl
    from spa.stages.train import run_train

    set_threads()
    with open(args.worker) as f:
        cfg = Config.from_dict(json.load(f))
    lay = Layout(cfg.output_dir)
    if args.iteration == 1:  # the seed pairs stand in for judged pairs: memory does not depend on the labels
        from spa import data as data_mod

        seed, _, _, _ = data_mod.seed_and_pools(cfg)
        atomic_write_jsonl(lay.pairs(1), [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in seed])
        read_jsonl(lay.pairs(1))
    if not _reset_cpu_peak():
        raise SystemExit("/proc/self/clear_refs is not writable here: the peak cannot be reset")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    run_train(cfg, args.iteration)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    from spa.io import read_json

    m = read_json(lay.stage_metrics(f"iter_{args.iteration}", "train"))
    print("RESULT " + json.dumps({"stage_peak_mb": (peak - base) / 2**20, "process_peak_mb": peak / 2**20,
                                  "seconds": seconds, "steps": m["train/steps"], "loss_type": m["train/loss_type"],
                                  "saved_mb": sum(os.path.getsize(os.path.join(lay.model(args.iteration), f))
                                                  for f in os.listdir(lay.model(args.iteration))) / 2**20}))


def build_model(folder: str, spec: dict) -> tuple[str, str, int]:
    """pi_init (randomly initialised, saved like a hub model) and the demo task's gold pairs; returns (model
    folder, pairs file, parameters)."""
    import torch

    from spa.models import load_tokenizer, new_model
    from spa.tasks.demo import build_task

    task = build_task(os.path.join(folder, "task"))
    tok = load_tokenizer(task["tokenizer"])
    torch.manual_seed(0)
    model = new_model(tok, {"model_type": "llama", **spec})
    out = os.path.join(folder, "pi_init")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, task["prefs"], sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the larger model")
    p.add_argument("--layers", type=int, default=4, help="layers of the larger model")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (train.batch_size)")
    p.add_argument("--only", default="", help="demo or larger")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--iteration", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from benchmarks._harness import print_table, write_csv

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    models = {"demo": DEMO, "larger": larger(args.hidden, args.layers)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in models.items():
            if args.only and name != args.only:
                continue
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            model_dir, prefs, n_params = build_model(folder, spec)
            for mode in ("full", "lora"):
                s = settings(folder, model_dir, prefs, mode, args.steps * args.batch, args.batch)
                cfg_path = os.path.join(folder, f"{mode}.json")
                with open(cfg_path, "w") as f:
                    json.dump(s, f)
                for iteration in (0, 1):
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", cfg_path,
                                           "--iteration", str(iteration)], env=env, capture_output=True, text=True)
                    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode or not line:
                        raise SystemExit(f"{name} {mode} iter {iteration} failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(line[0][len("RESULT "):])
                    rows.append({"model": name, "params_m": n_params / 1e6, "hidden": spec["hidden_size"],
                                 "layers": spec["num_hidden_layers"], "mode": mode, "stage": f"iter_{iteration}",
                                 **r})
                    print(f"{name} {mode} iter_{iteration}: stage peak {r['stage_peak_mb']:.0f} MiB, "
                          f"{r['seconds']:.1f} s", flush=True)
    for r in rows:  # LoRA's stage peak as a fraction of full fine-tuning's, same model and stage
        full = next(x for x in rows if x["model"] == r["model"] and x["stage"] == r["stage"] and x["mode"] == "full")
        r["vs_full"] = r["stage_peak_mb"] / full["stage_peak_mb"]
    print_table(rows, ["model", "params_m", "mode", "stage", "loss_type", "steps", "stage_peak_mb",
                       "process_peak_mb", "vs_full", "saved_mb", "seconds"],
                title=f"train stage peak RSS, LoRA r={LORA['r']} (all linear layers) vs full fine-tuning, "
                      f"{torch.get_num_threads()} torch thread(s)")
    print(write_csv(rows, "bench_peft_memory", torch.device("cpu")))


if __name__ == "__main__":
    main()
