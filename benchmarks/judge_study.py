"""Judge study over the built-in tasks: which self-judgment labels the model's own samples well, what each gives end
to end, and whether the held-out gold validation picks the model the oracle would.

For every built-in task (spa.tasks: reverse, add, repeat) and seed, the loop runs once per judge variant with the
demo's settings (`--quick` pools by default: 2 SPA iterations of 400 and 1000 prompts, 250 eval prompts; `--full`:
the demo's 3 iterations) and every iteration is trained, validated and evaluated (loop.patience=0):

  paper           SPA's implicit reward, reference pi_init:  beta * (log pi_{i-1} - log pi_init)
  ref-previous    reference = the previous iteration's model (the paper's ablation)
  no-ref          no reference: beta * log pi_{i-1} (the paper's ablation)
  no-ref-avg      no reference, log-prob averaged over response tokens (the model's per-token confidence)
  mix             half the reference: beta * (log pi_{i-1} - 0.5 log pi_init), the model's log-prob and the ratio
  token-avg       the paper's reward with log-probs averaged over response tokens
  length-regress  the paper's reward minus its least-squares fit on response length
  dlma            DLMA's contrastive-prompt self-reward
  gold            the task's gold oracle as judge (control: the same loop with a perfect judge)
  dpo-all-gold    baseline: DPO on every gold pair of the task (the paper's DPO-100% row; 1 epoch, no iterations)
DPO on the seed (iteration 0) is the same model in every variant of a task and seed: it is trained once and shared.

Reported (tables printed, results/judge_study_*_cpu.csv, results/judge_study_cpu.png):
  - per task and variant, mean ± std over seeds: the oracle win rate against SFT of the last iteration and of the
    model the run returns (loop.select=best with the default validation metric and patience), the judge's agreement
    with the oracle on the model's own samples (judge/oracle_accuracy, mean over iterations) and with the gold labels
    of the held-out seed pairs (judge/validation_accuracy);
  - the validator: for each candidate validation metric, the Spearman correlation between it and the oracle win rate
    over a run's iterations (mean over runs), how often the model it returns (patience as configured) is the
    oracle's best, and the mean win rate given up against the oracle's best (regret);
  - how far DPO on the seed moved the model: the mean |log pi_0(y) - log pi_init(y)| over pi_0's own samples (nats
    per response), beside the paper judge's agreement with the oracle.

    python benchmarks/judge_study.py                         # all tasks and variants, seeds 0 1 2
    python benchmarks/judge_study.py --tasks add --variants paper gold --seeds 0 --jobs 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import print_table, pyplot, save_figure, write_csv  # noqa: E402

VARIANTS = {
    "paper": [],
    "ref-previous": ["judge.reference=previous"],
    "no-ref": ["judge.reference=none"],
    "no-ref-avg": ["judge.reference=none", "judge.token_average=true"],
    "mix": ["judge.reference_weight=0.5"],
    "token-avg": ["judge.token_average=true"],
    "length-regress": ["judge.length_regress=true"],
    "dlma": ["judge.type=contrastive"],
    "gold": ["judge.type=function", "judge.function=spa.tasks.{task}:oracle"],
    "dpo-all-gold": ["data.seed_size=1.0", "data.validation_size=0", "loop.iterations=0", "train.seed_epochs=1"],
}
STUDY = ["loop.patience=0", "loop.select=best"]  # every iteration runs; the selection is recomputed below
METRICS = ("reward_accuracy", "reward_margin", "dpo_loss", "logp_accuracy", "logp_per_token_accuracy",
           "chosen_logp_per_token")


def run_dir(folder: str, task: str, variant: str, seed: int, quick: bool) -> str:
    return os.path.join(folder, "judge-study" + ("" if quick else "-full"), task, variant, f"seed_{seed}")


def overrides(variant: str, task: str) -> list[str]:
    return [o.replace("{task}", task) for o in VARIANTS[variant]] + STUDY


def run_one(folder: str, task: str, variant: str, seed: int, quick: bool) -> None:
    """One loop (resumable); iteration 0 and the SFT evaluation are copied from the task's `paper` run."""
    from spa.loop import run
    from spa.tasks.demo import build_sft_model, build_task, demo_config, share_seed_dpo

    paths = build_task(folder, task)
    sft_model = build_sft_model(paths, folder)
    out = run_dir(folder, task, variant, seed, quick)
    if variant not in ("paper", "dpo-all-gold"):
        share_seed_dpo(run_dir(folder, task, "paper", seed, quick), out)
    run(demo_config(paths, out, seed, quick, overrides(variant, task), sft_model))


def run_all(folder: str, tasks, variants, seeds, quick: bool, jobs: int) -> None:
    """The paper runs first (they hold the shared iteration 0), then the rest, `jobs` processes at a time (each
    with one thread: on a few cores, processes scale better than threads for models this small)."""
    from concurrent.futures import ThreadPoolExecutor

    from spa.tasks.demo import build_sft_model, build_task

    for task in tasks:  # the task files and SFT model once, before any parallel run needs them
        build_sft_model(build_task(folder, task), folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job):
        t, v, s = job
        out = run_dir(folder, t, v, s, quick)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        print(f"== {t} / {v} / seed {s}", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--dir", folder, "--one", t, v, str(s)]
        with open(out + ".log", "a") as log:
            proc = subprocess.run(cmd + ([] if quick else ["--full"]), env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"{t} / {v} / seed {s} failed ({proc.returncode}); see {out}.log")

    first = [(t, "paper", s) for t in tasks for s in seeds]  # iteration 0 of every variant comes from these
    rest = [(t, v, s) for t in tasks for v in variants if v != "paper" for s in seeds]
    for batch in (first, rest):
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, batch))


def collect(folder: str, tasks, variants, seeds, quick: bool) -> list[dict]:
    """One row per (task, variant, seed, model) from the finished runs."""
    from spa.io import Layout, read_json
    from spa.report import results_table

    rows = []
    for task in tasks:
        for v in variants:
            for s in seeds:
                d = run_dir(folder, task, v, s, quick)
                lay = Layout(d)
                if not os.path.exists(lay.metrics):
                    continue
                for r in results_table(d, 3):
                    it = r["iteration"]
                    row = {"task": task, "variant": v, "seed": s, "iteration": it,
                           **{k: r[k] for k in ("model", "win_rate", "score", "exact", "length", "judge_acc",
                                                "judge_val_acc")}}
                    if it is not None and os.path.exists(lay.validation(it)):
                        val = read_json(lay.validation(it))
                        row.update({m: val.get(f"val/{m}") for m in METRICS})
                    rows.append(row)
    return rows


def spearman(xs: list[float], ys: list[float]) -> float | None:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


def runs_of(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(task, variant, seed) -> its iteration rows (SFT left out), in iteration order."""
    out = defaultdict(list)
    for r in rows:
        if r["iteration"] is not None:
            out[(r["task"], r["variant"], r["seed"])].append(r)
    return {k: sorted(v, key=lambda r: r["iteration"]) for k, v in out.items()}


def returned(run: list[dict], metric: str, patience: int) -> dict:
    """The row loop.select=best returns with this metric and patience, replaying the loop's early stop."""
    from spa.validation import LOWER_IS_BETTER, choose_iteration

    if run[0].get(metric) is None:  # no validation (dpo-all-gold): the run returns its last model
        return run[-1]
    values = {}
    for r in run:
        values[r["iteration"]] = r[metric]
        best, stop = choose_iteration(values, patience, metric in LOWER_IS_BETTER, len(run) - 1)
        if stop:
            break
    return run[best]


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(rows: list[dict], metric: str, patience: int) -> list[dict]:
    out = []
    runs = runs_of(rows)
    for (task, variant) in dict.fromkeys((t, v) for t, v, _ in runs):
        group = [run for (t, v, _), run in runs.items() if (t, v) == (task, variant)]
        row = {"task": task, "variant": variant, "seeds": len(group)}
        for name, pick in (("last", lambda run: run[-1]), ("returned", lambda run: returned(run, metric, patience)),
                           ("dpo_seed", lambda run: run[0])):
            row[f"win_{name}"], row[f"win_{name}_std"] = mean_std([pick(run)["win_rate"] for run in group])
        row["returned_iterations"] = " ".join(str(returned(run, metric, patience)["iteration"]) for run in group)
        row["judge_acc"], _ = mean_std([r["judge_acc"] for run in group for r in run[1:]])
        row["judge_val_acc"], _ = mean_std([r["judge_val_acc"] for run in group for r in run[1:]])
        row["length_last"], _ = mean_std([run[-1]["length"] for run in group])
        out.append(row)
    return out


def validator(rows: list[dict], patience: int) -> list[dict]:
    """How well each validation metric tracks the oracle over a run's iterations (runs with >= 2 iterations)."""
    from spa.validation import LOWER_IS_BETTER

    runs = [run for run in runs_of(rows).values() if len(run) >= 3]
    out = []
    for m in METRICS:
        sign = -1 if m in LOWER_IS_BETTER else 1
        rho = [spearman([sign * r[m] for r in run], [r["win_rate"] for r in run]) for run in runs]
        hits, regret = [], []
        for run in runs:
            best = max(r["win_rate"] for r in run)
            got = returned(run, m, patience)["win_rate"]
            hits.append(float(got == best))
            regret.append(best - got)
        out.append({"metric": m, "runs": len(runs), "spearman": mean_std(rho)[0], "returns_oracle_best": mean_std(
            hits)[0], "regret": mean_std(regret)[0], "regret_max": max(regret) if regret else None})
    return out


@torch.inference_mode()
def seed_dpo_shift(folder: str, tasks, seeds, quick: bool) -> list[dict]:
    """How far DPO on the seed moved the model, on pi_0's own samples: mean |score| / beta of the paper judge."""
    from spa.config import Config
    from spa.io import Layout, read_json, read_jsonl

    out = []
    for task in tasks:
        for s in seeds:
            d = run_dir(folder, task, "paper", s, quick)
            lay = Layout(d)
            if not os.path.exists(lay.pairs(1)):
                continue
            beta = Config.load(lay.config).judge.beta
            shift = statistics.mean(abs(x) / beta for p in read_jsonl(lay.pairs(1)) for x in p["scores"])
            judge = read_json(lay.stage_metrics("iter_1", "judge"))
            out.append({"task": task, "seed": s, "shift_nats": shift, "judge_acc": judge.get("judge/oracle_accuracy"),
                        "judge_val_acc": judge.get("judge/validation_accuracy"),
                        "chosen_shorter": judge.get("judge/chosen_shorter_fraction")})
    return out


def plot(summary: list[dict], device) -> str:
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in summary if r["task"] == task]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["win_last"] or 0 for r in rs], 0.4, yerr=[r["win_last_std"] or 0 for r in rs],
               label="last iteration", capsize=2)
        ax.bar([x + 0.2 for x in xs], [r["win_returned"] or 0 for r in rs], 0.4,
               yerr=[r["win_returned_std"] or 0 for r in rs], label="returned (best on validation)", capsize=2)
        seed_dpo = next((r["win_dpo_seed"] for r in rs if r["variant"] == "paper"), None)
        if seed_dpo is not None:
            ax.axhline(seed_dpo, color="k", ls="--", lw=0.8, label="DPO on seed")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.set_xticks(list(xs), [r["variant"] for r in rs], rotation=60, ha="right")
        ax.set_title(task)
        ax.set_ylabel("oracle win rate vs SFT")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, "judge study (mean ± std over seeds)", "judge_study", device)


def main(argv=None) -> None:
    from spa.config import LoopConfig
    from spa.tasks import TASK_NAMES
    from spa.tasks.demo import default_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=list(TASK_NAMES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--full", action="store_true", help="the demo's 3 iterations instead of --quick's 2")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread)")
    p.add_argument("--dir", default=None, help="demo folder (default: spa demo's)")
    p.add_argument("--report-only", action="store_true", help="only read finished runs")
    p.add_argument("--selection-metric", default=None, choices=METRICS,
                   help="the validation metric the 'returned' columns replay (default: loop.selection_metric's)")
    p.add_argument("--patience", type=int, default=None, help="the patience they replay (default: loop.patience's)")
    p.add_argument("--one", nargs=3, metavar=("TASK", "VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = args.dir or default_dir()
    quick = not args.full
    if args.one:
        torch.set_num_threads(1)
        run_one(folder, args.one[0], args.one[1], int(args.one[2]), quick)
        return
    if not args.report_only:
        run_all(folder, args.tasks, args.variants, args.seeds, quick, args.jobs)
    device = torch.device("cpu")
    loop = LoopConfig()
    loop.selection_metric = args.selection_metric or loop.selection_metric
    loop.patience = loop.patience if args.patience is None else args.patience
    rows = collect(folder, args.tasks, args.variants, args.seeds, quick)
    summary = summarise(rows, loop.selection_metric, loop.patience)
    print_table(summary, ["task", "variant", "seeds", "win_last", "win_last_std", "win_returned", "win_returned_std",
                          "returned_iterations", "win_dpo_seed", "judge_acc", "judge_val_acc", "length_last"],
                f"win rate vs SFT (mean, std over seeds): last iteration and the returned model "
                f"(loop.select=best, {loop.selection_metric}, patience {loop.patience}); judge agreement with the "
                "oracle on the model's own samples and with the held-out gold pairs")
    checks = validator(rows, loop.patience)
    print_table(checks, ["metric", "runs", "spearman", "returns_oracle_best", "regret", "regret_max"],
                "the validator: does the held-out validation metric rank iterations as the oracle does?")
    shift = seed_dpo_shift(folder, args.tasks, args.seeds, quick)
    print_table(shift, ["task", "seed", "shift_nats", "judge_acc", "judge_val_acc", "chosen_shorter"],
                "how far DPO on the seed moved the model (mean |log pi_0 - log pi_init| per own sample) and the paper "
                "judge's agreement with the oracle (iteration 1)")
    tag = "" if quick else "_full"
    write_csv(rows, f"judge_study_runs{tag}", device)
    write_csv(summary, f"judge_study_summary{tag}", device)
    write_csv(checks, f"judge_study_validator{tag}", device)
    write_csv(shift, f"judge_study_seed_shift{tag}", device)
    print("plot:", plot(summary, device))


if __name__ == "__main__":
    main()
