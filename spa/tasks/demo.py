"""`spa demo`: build a built-in offline task and its SFT model (both cached), then per seed run the loop (DPO on
the 3.3% gold seed, SPA iterations, validation, evaluation) and print SFT / DPO on seed / each SPA iteration with
the oracle win rate against SFT, mean oracle score and length, and which model the run returns; over several
seeds, mean and spread; then the same with the SPA paper's judge, side by side (`--no-paper-judge` skips it).
`--task NAME` picks the task (spa.tasks: reverse, add, repeat), `--task all` runs each.

Layout under the demo folder (default ~/.cache/spa/demo, or $SPA_CACHE/demo):
    task-<version>/            tokenizer/, sft.jsonl, prefs.jsonl, eval_prompts.jsonl, eval_pairs.jsonl
    sft-<version>-<hash>/      the `sft` stage's run: sft/model/ is pi_init for every seed (hash: the SFT settings)
    <version>/full/seed_<s>/   one `spa run` directory per seed (config.yaml, metrics.json, sft/eval*, iter_*/);
                               <version> is the task's name and version, e.g. reverse-v1
    <version>/full/summary.json  the table's numbers per seed, their mean and standard deviation, the returned
                               model per seed, and run times
    <version>/full/paper_judge/seed_<s>/  the same runs with the SPA paper's judge (PAPER_JUDGE), started from the
                               default run's SFT evaluation and seed DPO (they do not depend on the judge)
    <version>/quick/...        the same for --quick
    <version>/full-<hash>/, <version>/quick-<hash>/  the same for runs with --set overrides (hash: the overrides),
                               so that e.g. `spa demo --set judge.reference=init` sits beside the default demo
                               instead of colliding with it
Rerunning resumes (finished runs are only re-read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from importlib import resources

import yaml

from ..config import Config
from ..io import atomic_dir, atomic_write_json, atomic_write_jsonl, commit_dir, read_json
from ..plots import plot_results
from ..report import format_table, results_table
from . import TASK_NAMES, get_task
from .chartok import char_tokenizer

logger = logging.getLogger("spa")

FULL_SEEDS = (0, 1, 2)
SFT_SEED = 0  # one SFT model for all seeds, as in the paper (every run starts from the same pi_init)
# --quick: one seed, two SPA iterations on smaller pools (the paper's 8K : 20K proportion kept), fewer eval prompts.
QUICK = ["loop.iterations=2", "data.iteration_prompts=[400, 1000]", "eval.max_prompts=250"]
# The SPA paper's judge, run beside the default recipe (same SFT model, seed DPO, settings) for comparison.
PAPER_JUDGE = ["judge.type=implicit", "judge.reference=init", "judge.reference_weight=1.0",
               "judge.token_average=false", "judge.length_regress=false", "judge.length_penalty=0.0"]
METRICS = ("win_rate", "score", "exact", "length", "reward_acc", "val_acc", "judge_val_acc", "judge_acc")


def default_dir() -> str:
    base = os.environ.get("SPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spa")
    return os.path.join(base, "demo")


def build_task(folder: str, task: str = "reverse") -> dict[str, str]:
    """Writes the task's files and tokenizer once (atomically); returns their paths (and the task's name)."""
    t = get_task(task)
    final = os.path.join(folder, f"task-{t.version}")
    names = ("sft", "prefs", "eval_prompts", "eval_pairs")
    paths = {n: os.path.join(final, f"{n}.jsonl") for n in names}
    paths["tokenizer"] = os.path.join(final, "tokenizer")
    if not os.path.exists(final):
        tmp = atomic_dir(final)
        for name, rows in t.build().items():
            atomic_write_jsonl(os.path.join(tmp, f"{name}.jsonl"), rows)
        char_tokenizer(t.alphabet).save_pretrained(os.path.join(tmp, "tokenizer"))
        commit_dir(tmp, final)
    paths["task"] = task
    return paths


def demo_config(task: dict[str, str], output_dir: str, seed: int, quick: bool = False,
                overrides: list[str] | None = None, sft_model: str | None = None) -> Config:
    """The demo's config (spa/tasks/demo.yaml + the task's paths, oracle and response lengths); with sft_model,
    that model is pi_init and the run has no sft stage."""
    with resources.files("spa.tasks").joinpath("demo.yaml").open() as f:
        base = yaml.safe_load(f)
    name = task.get("task", "reverse")
    sets = [f"output_dir={output_dir}", f"seed={seed}", f"model.tokenizer={task['tokenizer']}",
            f"sft.data={task['sft']}", f"data.seed={task['prefs']}", f"eval.prompts={task['eval_prompts']}",
            f"eval.pairs={task['eval_pairs']}", f"eval.oracle=spa.tasks.{name}:oracle",
            *get_task(name).demo_overrides]
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
    version = get_task(task.get("task", "reverse")).version
    # the settings the SFT model depends on; the task's files are named by its version, not by where the cache is
    key = {"task": version, "sft": {k: v for k, v in d["sft"].items() if k != "data"},
           "model": {k: v for k, v in d["model"].items() if k not in ("tokenizer", "name_or_path")}, "seed": d["seed"],
           "data": {k: d["data"][k] for k in ("max_prompt_length", "long_prompts", "chat_template", "skip_invalid")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    cfg = cfg.replace(output_dir=os.path.join(folder, f"sft-{version}-{digest}"))
    run_stage(cfg, stage_by_name(cfg, "sft"))
    return Layout(cfg.output_dir).sft_model


def _agg(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def returned_row(rows: list[dict]) -> dict | None:
    """The results-table row of the model a run returns (marked `selected`)."""
    return next((r for r in rows if r.get("selected")), None)


def summarise_seeds(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Mean and std over seeds of every table column, per model, plus a row "returned" for the model each run
    returns (which iteration it is may differ between seeds)."""
    seeds = list(per_seed)
    models = list(dict.fromkeys(r["model"] for s in seeds for r in per_seed[s]))  # seeds may stop at different
    out = []                                                                       # iterations
    for m in models + ["returned"]:
        pick = (lambda rows: returned_row(rows)) if m == "returned" else (
            lambda rows, m=m: next((r for r in rows if r["model"] == m), None))
        picked = [pick(per_seed[s]) for s in seeds]
        row = {"model": m, "seeds": sum(p is not None for p in picked)}
        for key in METRICS:
            mean, sd = _agg((p or {}).get(key) for p in picked)
            row[key], row[key + "_std"] = mean, sd
        out.append(row)
    return out


def format_summary(rows: list[dict], seeds) -> str:
    pm = lambda v, sd, p: "-" if v is None else f"{v:.{p}f} ± {sd:.{p}f}"
    cols = (("win_rate", "win rate vs SFT", 3), ("score", "oracle score", 3), ("exact", "exact", 3),
            ("length", "length", 1), ("val_acc", "val acc", 3), ("judge_val_acc", "judge val acc", 3),
            ("judge_acc", "judge acc", 3))
    head = f"{'model':<14} {'seeds':>5}" + "".join(f" {name:>15}" for _, name, _ in cols)
    lines = [f"mean ± std over seeds {list(seeds)} (seeds: how many runs reached that model)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<14} {r['seeds']:>5}" + "".join(f" {pm(r[k], r[k + '_std'], p):>15}"
                                                                   for k, _, p in cols))
    return "\n".join(lines)


def share_seed_dpo(source_run: str, run_dir: str) -> None:
    """Starts run_dir from source_run's SFT evaluation and iteration 0 (DPO on the seed, its validation and
    evaluation), which do not depend on the judge: a variant that differs only from iteration 1 on reuses them."""
    if os.path.exists(run_dir):
        return
    tmp = atomic_dir(run_dir)
    for part in ("sft", "iter_0"):
        if os.path.isdir(os.path.join(source_run, part)):
            shutil.copytree(os.path.join(source_run, part), os.path.join(tmp, part))
    commit_dir(tmp, run_dir)


def run_demo(quick: bool = False, seeds=None, folder: str | None = None, overrides: list[str] | None = None,
             task: str = "reverse", paper_judge: bool = True) -> dict:
    """Runs (or resumes) the demo on one built-in task, or every one with task="all"; prints and returns the
    summary (for "all": {task: summary})."""
    if task == "all":
        return {t: run_demo(quick, seeds, folder, overrides, t, paper_judge) for t in TASK_NAMES}
    from ..loop import run

    folder = folder or default_dir()
    seeds = list(seeds if seeds is not None else ((0,) if quick else FULL_SEEDS))
    t_start = time.perf_counter()
    t = get_task(task)
    paths = build_task(folder, task)
    t0 = time.perf_counter()
    sft_model = build_sft_model(paths, folder, overrides)
    sft_seconds = time.perf_counter() - t0
    mode = "quick" if quick else "full"
    if overrides:  # a different experiment: its own runs (the stored configs would otherwise be refused)
        mode += "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    out_dir = os.path.join(folder, t.version, mode)
    if paper_judge:  # nothing to compare when the settings' judge already is the paper's
        judges = [demo_config(paths, out_dir, 0, quick, list(overrides or []) + extra, sft_model).judge
                  for extra in ([], PAPER_JUDGE)]
        paper_judge = judges[0] != judges[1]
        if not paper_judge:
            print(f"[{task}] the judge of these settings is the SPA paper's: no side-by-side run")
    variants = {"default": []} | ({"paper_judge": PAPER_JUDGE} if paper_judge else {})
    results = {}
    for name, extra in variants.items():
        per_seed, times, selected = {}, {}, {}
        for s in seeds:
            run_dir = os.path.join(out_dir, *([] if name == "default" else [name]), f"seed_{s}")
            if name != "default":
                share_seed_dpo(os.path.join(out_dir, f"seed_{s}"), run_dir)
            cfg = demo_config(paths, run_dir, s, quick, list(overrides or []) + extra, sft_model)
            t0 = time.perf_counter()
            metrics = run(cfg)
            times[s] = time.perf_counter() - t0
            per_seed[s] = results_table(cfg.output_dir, cfg.loop.iterations)
            selected[s] = metrics.get("selected")
            label = "" if name == "default" else " with the paper's judge (" + ", ".join(extra) + ")"
            print(format_table(per_seed[s], title=f"\n[{task}] seed {s}{label} ({cfg.output_dir}, {times[s]:.0f} s "
                                                  "this call)"))
            if selected[s]:
                print(f"seed {s}: {selected[s]['reason']}")
        rows = summarise_seeds(per_seed)
        if len(seeds) > 1:
            print(f"\n[{task}]{label} " + format_summary(rows, seeds))
        results[name] = {"per_seed": {str(s): per_seed[s] for s in seeds}, "selected": {str(s): selected[s]
                                                                                        for s in seeds},
                         "mean_std": rows, "seconds_per_seed": times}
    demos = t.exact_rate(json.loads(line) for line in open(paths["sft"]))
    sft_eval = os.path.join(out_dir, f"seed_{seeds[0]}", "sft", "eval.json")
    sft_exact = read_json(sft_eval).get("eval/exact_rate") if os.path.exists(sft_eval) else None
    if sft_exact is not None:
        print(f"[{task}] the SFT model answers exactly on {sft_exact:.1%} of held-out prompts (sampling, T="
              f"{cfg.eval.temperature}); its demonstrators did on {demos:.1%}")
    if paper_judge:
        ours, paper = (results[n]["mean_std"][-1] for n in ("default", "paper_judge"))
        print(f"[{task}] the returned model's win rate vs SFT: {ours['win_rate']:.3f} with spa's default judge, "
              f"{paper['win_rate']:.3f} with the paper's judge")
    total = time.perf_counter() - t_start
    print(f"\n[{task}] total {total:.0f} s this call ({mode} demo, seeds {seeds}; SFT model {sft_seconds:.0f} s); "
          f"results in {out_dir}")
    summary = {"task": task, "mode": mode, "overrides": list(overrides or []), "seeds": seeds, "sft_model": sft_model,
               "sft_exact_rate": sft_exact, "demonstrators_exact_rate": demos, **results.pop("default"),
               "paper_judge": results.get("paper_judge"), "seconds_this_call": total,
               "seconds_sft_this_call": sft_seconds}
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    plot_results(summary["mean_std"], os.path.join(out_dir, "results.png"), f"{task} demo ({mode}), seeds {seeds}")
    return summary
