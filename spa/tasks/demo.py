"""`spa demo`: build the offline task and the SFT model (both cached), then per seed run the loop (DPO on the
3.3% gold seed, SPA iterations, evaluation) and print SFT / DPO on seed / each SPA iteration with the oracle win
rate against SFT, mean oracle score and length; over several seeds, mean and spread.

Layout under the demo folder (default ~/.cache/spa/demo, or $SPA_CACHE/demo):
    task-<version>/            tokenizer/, sft.jsonl, prefs.jsonl, eval_prompts.jsonl, eval_pairs.jsonl
    sft-<version>-<hash>/      the `sft` stage's run: sft/model/ is pi_init for every seed (hash: the SFT settings)
    full/seed_<s>/             one `spa run` directory per seed (config.yaml, metrics.json, sft/eval*, iter_*/)
    full/summary.json          the table's numbers per seed, their mean and standard deviation, and run times
    quick/...                  the same for --quick
    full-<hash>/, quick-<hash>/  the same for runs with --set overrides (hash: the overrides), so that e.g.
                               `spa demo --set judge.reference=none` sits beside the default demo instead of
                               colliding with it
Rerunning resumes (finished runs are only re-read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from importlib import resources

import yaml

from ..config import Config
from ..eval import format_table, results_table
from ..io import atomic_dir, atomic_write_json, atomic_write_jsonl, commit_dir
from . import reverse
from .chartok import char_tokenizer

logger = logging.getLogger("spa")

TASK_VERSION = "reverse-v1"
FULL_SEEDS = (0, 1, 2)
SFT_SEED = 0  # one SFT model for all seeds, as in the paper (every run starts from the same pi_init)
# --quick: one seed, two SPA iterations on smaller pools (the paper's 8K : 20K proportion kept), fewer eval prompts.
QUICK = ["loop.iterations=2", "data.iteration_prompts=[400, 1000]", "eval.max_prompts=250"]


def default_dir() -> str:
    base = os.environ.get("SPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spa")
    return os.path.join(base, "demo")


def build_task(folder: str) -> dict[str, str]:
    """Writes the task's files and tokenizer once (atomically); returns their paths."""
    final = os.path.join(folder, f"task-{TASK_VERSION}")
    names = ("sft", "prefs", "eval_prompts", "eval_pairs")
    paths = {n: os.path.join(final, f"{n}.jsonl") for n in names}
    paths["tokenizer"] = os.path.join(final, "tokenizer")
    if not os.path.exists(final):
        tmp = atomic_dir(final)
        for name, rows in reverse.build().items():
            atomic_write_jsonl(os.path.join(tmp, f"{name}.jsonl"), rows)
        char_tokenizer().save_pretrained(os.path.join(tmp, "tokenizer"))
        commit_dir(tmp, final)
    return paths


def demo_config(task: dict[str, str], output_dir: str, seed: int, quick: bool = False,
                overrides: list[str] | None = None, sft_model: str | None = None) -> Config:
    """The demo's config (spa/tasks/demo.yaml + the task's paths); with sft_model, that model is pi_init and the
    run has no sft stage."""
    with resources.files("spa.tasks").joinpath("demo.yaml").open() as f:
        base = yaml.safe_load(f)
    sets = [f"output_dir={output_dir}", f"seed={seed}", f"model.tokenizer={task['tokenizer']}",
            f"sft.data={task['sft']}", f"data.seed={task['prefs']}", f"eval.prompts={task['eval_prompts']}",
            f"eval.pairs={task['eval_pairs']}"]
    sets += QUICK if quick else []
    sets += list(overrides or [])
    if sft_model:
        sets += ["sft.enabled=false", f"model.name_or_path={sft_model}"]
    return Config.from_dict(base, sets, source="spa/tasks/demo.yaml")


def build_sft_model(task: dict[str, str], folder: str, overrides: list[str] | None = None) -> str:
    """pi_init, trained from scratch by the `sft` stage once per SFT setting (cached, resumable); returns its folder.
    The folder name hashes the settings the SFT stage depends on, so `--set sft.epochs=...` trains a new one."""
    from ..io import Layout
    from ..loop import run_stage, stage_by_name

    cfg = demo_config(task, os.path.join(folder, "sft-pending"), SFT_SEED, overrides=overrides)
    d = cfg.to_dict()
    key = {"sft": d["sft"], "model": d["model"], "seed": d["seed"],
           "data": {k: d["data"][k] for k in ("max_prompt_length", "long_prompts", "chat_template", "skip_invalid")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    cfg = cfg.replace(output_dir=os.path.join(folder, f"sft-{TASK_VERSION}-{digest}"))
    run_stage(cfg, stage_by_name(cfg, "sft"))
    return Layout(cfg.output_dir).sft_model


def _agg(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_demo(quick: bool = False, seeds=None, folder: str | None = None, overrides: list[str] | None = None) -> dict:
    """Runs (or resumes) the demo; prints and returns the summary."""
    from ..loop import run

    folder = folder or default_dir()
    seeds = list(seeds if seeds is not None else ((0,) if quick else FULL_SEEDS))
    t_start = time.perf_counter()
    task = build_task(folder)
    t0 = time.perf_counter()
    sft_model = build_sft_model(task, folder, overrides)
    sft_seconds = time.perf_counter() - t0
    mode = "quick" if quick else "full"
    if overrides:  # a different experiment: its own runs (the stored configs would otherwise be refused)
        mode += "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    per_seed, times = {}, {}
    for s in seeds:
        cfg = demo_config(task, os.path.join(folder, mode, f"seed_{s}"), s, quick, overrides, sft_model)
        t0 = time.perf_counter()
        run(cfg)
        times[s] = time.perf_counter() - t0
        per_seed[s] = results_table(cfg.output_dir, cfg.loop.iterations)
        print(format_table(per_seed[s], title=f"\nseed {s} ({cfg.output_dir}, {times[s]:.0f} s this call)"))
    models = [r["model"] for r in per_seed[seeds[0]]]
    summary_rows = []
    for m in models:
        row = {"model": m}
        for key in ("win_rate", "score", "length", "reward_acc", "judge_acc"):
            mean, sd = _agg(next((r[key] for r in per_seed[s] if r["model"] == m), None) for s in seeds)
            row[key], row[key + "_std"] = mean, sd
        summary_rows.append(row)
    if len(seeds) > 1:
        pm = lambda v, sd, p: "-" if v is None else f"{v:.{p}f} ± {sd:.{p}f}"
        head = (f"{'model':<14} {'win rate vs SFT':>17} {'oracle score':>15} {'length':>12} {'reward acc':>15} "
                f"{'judge acc':>15}")
        lines = [f"\nmean ± std over seeds {seeds}", head, "-" * len(head)]
        for r in summary_rows:
            lines.append(f"{r['model']:<14} {pm(r['win_rate'], r['win_rate_std'], 3):>17} "
                         f"{pm(r['score'], r['score_std'], 3):>15} {pm(r['length'], r['length_std'], 1):>12} "
                         f"{pm(r['reward_acc'], r['reward_acc_std'], 3):>15} "
                         f"{pm(r['judge_acc'], r['judge_acc_std'], 3):>15}")
        print("\n".join(lines))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s this call ({mode} demo, seeds {seeds}; SFT model {sft_seconds:.0f} s); "
          f"results in {os.path.join(folder, mode)}")
    summary = {"mode": mode, "overrides": list(overrides or []), "seeds": seeds, "sft_model": sft_model,
               "per_seed": {str(s): per_seed[s] for s in seeds},
               "mean_std": summary_rows, "seconds_this_call": total, "seconds_sft_this_call": sft_seconds,
               "seconds_per_seed": times}
    atomic_write_json(os.path.join(folder, mode, "summary.json"), summary)
    return summary
