"""`spa demo` ablations: is the failure of the SPA paper's judge on the `reverse` task the method or the
implementation? (The judge study over all built-in tasks, with held-out validation: benchmarks/judge_study.py.)

Runs the demo's loop (same task, same cached SFT model, same seeds, same settings) with one thing changed per
variant, and studies the judges on fixed samples:

  variants (end to end, 3 seeds):
    spa            the paper's method (its judge: implicit reward with reference pi_init)
    no-refine      SPA without the self-refinement loss (the paper's "data expansion only" ablation)
    dlma-judge     DLMA's contrastive self-reward as the judge instead of SPA's implicit reward
    judge-ref-previous, judge-no-ref
                   SPA with the implicit judge's reference set to the previous iteration's model, or to none
                   (judge.reference: the paper's own ablation of the judge; SPA's default is pi_init)
    gold-judge     the gold oracle as the judge (judge.type: function): the same loop with a perfect judge, the
                   control that separates the judge from the rest of the loop (generate, DPO, refinement)

  judge study (iteration 1 of `spa`, i.e. pi_0's own samples, pairs the oracle orders): agreement with the oracle
    of SPA's implicit reward and of other scores of the same responses, overall and by length relation;
    and what each model's evaluation responses are (exact reversal, truncated, padded, copy, ...).

    python benchmarks/demo_ablations.py                      # all variants, seeds 0 1 2 (~20 min on 2 CPU cores)
    python benchmarks/demo_ablations.py --variants spa gold-judge --seeds 0

Writes results/demo_ablations_cpu.{csv,png}, results/demo_judge_study_cpu.csv and
results/demo_response_kinds_cpu.csv (the suffix is the device the loop ran on).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import print_table, pyplot, save_figure, write_csv  # noqa: E402

# Every variant is the SPA paper's method with one change, in the setting these ablations were first run in: the
# whole seed trained on (no validation hold-out) and every iteration kept (no selection).
PAPER = ["judge.type=implicit", "judge.reference=init", "judge.reference_weight=1.0", "judge.token_average=false",
         "data.validation_size=0", "loop.select=last"]
VARIANTS = {
    "spa": PAPER,
    "no-refine": PAPER + ["refine.enabled=false"],
    "dlma-judge": PAPER + ["judge.type=contrastive"],
    "judge-ref-previous": PAPER + ["judge.reference=previous"],
    "judge-no-ref": PAPER + ["judge.reference=none"],
    "gold-judge": PAPER + ["judge.type=function", "judge.function=spa.tasks.reverse:oracle"],
}


def run_variants(folder: str, seeds: list[int], names: list[str]) -> tuple[list[dict], dict[str, list[str]]]:
    from spa.loop import run
    from spa.report import results_table
    from spa.tasks.demo import build_sft_model, build_task, demo_config

    task = build_task(folder)
    sft_model = build_sft_model(task, folder)
    rows, dirs = [], defaultdict(list)
    for name in names:
        for s in seeds:
            out = os.path.join(folder, "ablations", name, f"seed_{s}")
            cfg = demo_config(task, out, s, overrides=VARIANTS[name], sft_model=sft_model)
            print(f"== {name}, seed {s}: {out}", flush=True)
            run(cfg)
            dirs[name].append(out)
            for r in results_table(out, cfg.loop.iterations):
                rows.append({"variant": name, "seed": s, **r})
    return rows, dirs


def summarise(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["model"])].append(r)
    out = []
    for (variant, model), rs in groups.items():
        row = {"variant": variant, "model": model, "seeds": len(rs)}
        for key in ("win_rate", "score", "length", "judge_acc"):
            vals = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.mean(vals) if vals else None
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        out.append(row)
    return out


def plot(summary: list[dict], device) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    order = ["SFT", "DPO on seed"] + sorted({r["model"] for r in summary if r["model"].startswith("SPA")})
    for variant in dict.fromkeys(r["variant"] for r in summary):
        pts = {r["model"]: r for r in summary if r["variant"] == variant}
        xs = [i for i, m in enumerate(order) if m in pts and pts[m]["win_rate"] is not None]
        ax.errorbar(xs, [pts[order[i]]["win_rate"] for i in xs], yerr=[pts[order[i]]["win_rate_std"] for i in xs],
                    marker="o", capsize=3, label=variant)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(order)), [m.replace("SPA ", "") for m in order])
    ax.set_ylabel("oracle win rate vs SFT (mean ± std over seeds)")
    ax.legend()
    return save_figure(fig, "spa demo ablations", "demo_ablations", device)


@torch.inference_mode()
def judge_study(run_dir: str, sft_model: str) -> list[dict]:
    """Scores pi_0's iteration-1 samples (both responses of every prompt whose two responses the oracle orders)
    with SPA's implicit reward and other scores of the same responses; accuracy against the oracle (judge ties
    count 1/2), overall and by whether the oracle's better response is the longer, shorter or same length."""
    from spa import Config
    from spa.data import PromptEncoder, prompt_text
    from spa.io import Layout, read_jsonl
    from spa.judges import ContrastivePromptJudge
    from spa.models import load_causal_lm, load_tokenizer
    from spa.scoring import score_sequences
    from spa.tasks import reverse

    cfg = Config.load(os.path.join(run_dir, "config.yaml"))
    lay = Layout(run_dir)
    tok = load_tokenizer(lay.model(0))
    enc = PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    pi0 = load_causal_lm(lay.model(0), cfg.model, torch.device("cpu"))
    init = load_causal_lm(sft_model, cfg.model, torch.device("cpu"))
    rows = []
    for r in read_jsonl(lay.samples(1)):
        a, b = r["responses"][:2]
        q = prompt_text(r["prompt"])
        if a != b and reverse.oracle(q, a) != reverse.oracle(q, b):
            better = int(reverse.oracle(q, b) > reverse.oracle(q, a))
            rows.append({"prompt": r["prompt"], "responses": [a, b], "better": better})
    items = [(enc.encode(r["prompt"]), enc.encode_response(x)) for r in rows for x in r["responses"]]
    n_tok = torch.tensor([len(ids) for _, ids in items], dtype=torch.float32)
    lp0 = score_sequences(pi0, items, tok.pad_token_id, 256)
    lpi = score_sequences(init, items, tok.pad_token_id, 256)
    beta = cfg.judge.beta
    dlma = ContrastivePromptJudge(pi0, enc, cfg.judge.positive_prompt, cfg.judge.negative_prompt, 256)
    scores = {
        "implicit reward, summed (SPA)": beta * (lp0 - lpi),
        "implicit reward, token mean": beta * (lp0 - lpi) / n_tok,
        "pi_0 log-prob, summed": lp0,
        "pi_0 log-prob, token mean": lp0 / n_tok,
        "pi_init log-prob, summed": lpi,
        "DLMA contrastive self-reward": torch.tensor([s for row in dlma.score(rows) for s in row]),
    }
    relation = []
    for r, (la, lb) in zip(rows, n_tok.view(-1, 2).tolist()):
        lw, ll = (lb, la) if r["better"] else (la, lb)
        relation.append("better is same length" if lw == ll else "better is longer" if lw > ll else "better is shorter")
    out = []
    for name, s in scores.items():
        s = s.view(-1, 2)
        hits = [0.5 if s[i, 0] == s[i, 1] else float(int(s[i, 1] > s[i, 0]) == r["better"]) for i, r in enumerate(rows)]
        row = {"run": os.path.basename(run_dir), "score": name, "pairs": len(rows), "accuracy": statistics.mean(hits)}
        for rel in ("better is longer", "better is shorter", "better is same length"):
            sel = [h for h, x in zip(hits, relation) if x == rel]
            row[f"acc: {rel}"] = statistics.mean(sel) if sel else None
            row[f"n: {rel}"] = len(sel)
        out.append(row)
    return out


def mean_over_runs(rows: list[dict], key: str) -> list[dict]:
    """One row per value of `key`: the mean over runs (seeds) of every other numeric column."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return [{"run": "mean", key: k, **{c: statistics.mean(x[c] for x in v if x[c] is not None)
                                       for c in v[0] if c not in ("run", key)}} for k, v in groups.items()]


def response_kinds(run_dir: str, iterations: int) -> list[dict]:
    """What each model's evaluation responses are (spa.tasks.reverse.error_kind), as fractions."""
    from spa.data import prompt_text
    from spa.io import Layout, eval_name, read_jsonl
    from spa.tasks import reverse

    lay = Layout(run_dir)
    out = []
    for i in [None] + list(range(iterations + 1)):
        path = lay.path(eval_name(i), "eval_samples.jsonl")
        if not os.path.exists(path):
            continue
        c = Counter(reverse.error_kind(prompt_text(r["prompt"]), x) for r in read_jsonl(path) for x in r["responses"])
        n = sum(c.values())
        label = "SFT" if i is None else "DPO on seed" if i == 0 else f"SPA iter {i}"
        out.append({"run": os.path.basename(run_dir), "model": label, **{k: c[k] / n for k in reverse.ERROR_KINDS}})
    return out


def main(argv=None) -> None:
    from spa.tasks.demo import default_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dir", default=None, help="the demo folder (default: spa demo's, ~/.cache/spa/demo)")
    args = p.parse_args(argv)
    folder = args.dir or default_dir()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    rows, dirs = run_variants(folder, args.seeds, args.variants)
    summary = summarise(rows)
    print_table(summary, ["variant", "model", "seeds", "win_rate", "win_rate_std", "score", "score_std", "length",
                          "judge_acc", "judge_acc_std"], "win rate vs SFT, oracle score, length, judge agreement with "
                                                          "the oracle (mean and std over seeds)")
    write_csv(rows + [{**r, "seed": "mean"} for r in summary], "demo_ablations", device)
    print("plot:", plot(summary, device))

    if "spa" in dirs:
        from spa.tasks.demo import build_sft_model, build_task

        sft_model = build_sft_model(build_task(folder), folder)
        study = [r for d in dirs["spa"] for r in judge_study(d, sft_model)]
        mean_rows = mean_over_runs(study, "score")
        print_table(mean_rows, ["score", "pairs", "accuracy", "acc: better is longer", "acc: better is shorter",
                                "acc: better is same length", "n: better is longer", "n: better is shorter"],
                    "judge study: pi_0's own samples (iteration 1 of spa), agreement with the oracle, mean over seeds")
        write_csv(study + mean_rows, "demo_judge_study", device)
        kinds = [r for d in dirs["spa"] for r in response_kinds(d, 3)]
        kind_rows = mean_over_runs(kinds, "model")
        from spa.tasks.reverse import ERROR_KINDS

        print_table(kind_rows, ["model", *ERROR_KINDS], "spa: what the evaluation responses are (fractions, mean over "
                                                       "seeds)")
        write_csv(kinds + kind_rows, "demo_response_kinds", device)


if __name__ == "__main__":
    main()
