"""`spa demo`: build the offline task (cached), then per seed run the whole loop (SFT from scratch, DPO on the
3.3% gold seed, SPA iterations, evaluation) and print SFT / DPO on seed / each SPA iteration with the oracle win
rate against SFT, mean oracle score and length; over several seeds, mean and spread.

Layout under the demo folder (default ~/.cache/spa/demo, or $SPA_CACHE/demo):
    task-<version>/   tokenizer/, sft.jsonl, prefs.jsonl, eval_prompts.jsonl, eval_pairs.jsonl
    full/seed_<s>/    one `spa run` directory per seed (config.yaml, metrics.json, sft/, iter_*/)
    full/summary.json the table's numbers per seed, their mean and standard deviation, and run times
    quick/...         the same for --quick
Rerunning resumes (finished runs are only re-read).
"""

from __future__ import annotations

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
                overrides: list[str] | None = None) -> Config:
    with resources.files("spa.tasks").joinpath("demo.yaml").open() as f:
        base = yaml.safe_load(f)
    sets = [f"output_dir={output_dir}", f"seed={seed}", f"model.tokenizer={task['tokenizer']}",
            f"sft.data={task['sft']}", f"data.seed={task['prefs']}", f"eval.prompts={task['eval_prompts']}",
            f"eval.pairs={task['eval_pairs']}"]
    return Config.from_dict(base, sets + (QUICK if quick else []) + list(overrides or []), source="spa/tasks/demo.yaml")


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
    mode = "quick" if quick else "full"
    per_seed, times = {}, {}
    for s in seeds:
        cfg = demo_config(task, os.path.join(folder, mode, f"seed_{s}"), s, quick, overrides)
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
    print(f"\ntotal {total:.0f} s this call ({mode} demo, seeds {seeds}); results in {os.path.join(folder, mode)}")
    summary = {"mode": mode, "seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds},
               "mean_std": summary_rows, "seconds_this_call": total, "seconds_per_seed": times}
    atomic_write_json(os.path.join(folder, mode, "summary.json"), summary)
    return summary
