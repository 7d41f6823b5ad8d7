"""What `spa` prints: one line per finished stage with its key numbers, and the closing summary of `spa run`
(the results table, the returned model and where the plot is). Everything else the stages log goes to files in
the run directory (metrics.json, <stage>_metrics.json, iter_<i>/train_log.jsonl)."""

from __future__ import annotations

import os
import re
import warnings

from .io import Layout, eval_name, read_json
from .validation import model_label

# (metric, label, format) shown for a stage kind, when the stage recorded it
STAGE_NUMBERS = {
    "sft": (("sft/final_loss", "loss", ".3f"), ("sft/examples", "examples", "d"), ("sft/steps", "steps", "d"),
            ("data/unknown_tokens", "unknown tokens", "d")),
    "train": (("train/final_loss", "loss", ".3f"), ("train/rewards/accuracies", "reward acc", ".2f"),
              ("train/pairs", "pairs", "d"), ("train/steps", "steps", "d"), ("data/unknown_tokens", "unknown tokens",
                                                                          "d")),
    "generate": (("generate/prompts", "prompts", "d"), ("generate/responses", "responses", "d"),
                 ("generate/mean_tokens", "mean tokens", ".1f"), ("generate/tokens_per_s", "tokens/s", ".0f")),
    "judge": (("judge/pairs", "pairs", "d"), ("judge/validation_accuracy", "judge val acc", ".3f"),
              ("judge/oracle_accuracy", "oracle agreement (ties 1/2)", ".3f")),
    "validate": (("val/reward_accuracy", "val reward acc", ".3f"), ("val/dpo_loss", "val DPO loss", ".3f")),
    "eval": (("eval/win_rate_vs_sft", "win rate vs SFT (ties 1/2)", ".3f"), ("eval/mean_score", "oracle score", ".3f"),
             ("eval/mean_tokens", "length", ".1f"), ("eval/reward_accuracy", "reward acc", ".3f")),
}


def _fmt(value, spec: str) -> str:
    if spec == "d" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def stage_line(name: str, metrics: dict, seconds: float | None = None) -> str:
    """'iter_1/train: done in 12 s: loss 0.612, reward acc 0.75, pairs 40, steps 5' from the stage's metrics."""
    kind = name.rsplit("/", 1)[-1]
    parts = [f"{label} {_fmt(metrics[key], spec)}" for key, label, spec in STAGE_NUMBERS.get(kind, ())
             if metrics.get(key) is not None]
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    return f"{name}: done{took}" + (": " + ", ".join(parts) if parts else "")


def results_table(output_dir: str, iterations: int) -> list[dict]:
    """One row per evaluated model: SFT, DPO on the seed (iter_0), SPA iterations. `val_acc`: the model's reward
    accuracy on the held-out seed pairs (val/reward_accuracy); `judge_val_acc`: the iteration's judge on those pairs
    (judge/validation_accuracy); `judge_acc`: how often the iteration's self-judgment chose what the oracle prefers
    on the model's own samples (judge/oracle_accuracy, when eval.oracle is set; oracle ties count 1/2);
    `selected`: the model the run returns (selected.json)."""
    lay = Layout(output_dir)
    selected = read_json(lay.selected)["iteration"] if os.path.exists(lay.selected) else None
    rows = []
    for i in [None] + list(range(iterations + 1)):
        path = lay.eval(eval_name(i))
        try:
            r = read_json(path)
        except FileNotFoundError:
            continue
        judge_path = lay.stage_metrics(eval_name(i), "judge")
        judge = read_json(judge_path) if i and os.path.exists(judge_path) else {}
        val = read_json(lay.validation(i)) if i is not None and os.path.exists(lay.validation(i)) else {}
        rows.append({"model": "SFT" if i is None else model_label(i), "iteration": i,
                     "win_rate": r.get("eval/win_rate_vs_sft"),
                     "score": r.get("eval/mean_score"), "exact": r.get("eval/exact_rate"),
                     "length": r.get("eval/mean_tokens"), "reward_acc": r.get("eval/reward_accuracy"),
                     "val_acc": val.get("val/reward_accuracy"), "judge_val_acc": judge.get("judge/validation_accuracy"),
                     "judge_acc": judge.get("judge/oracle_accuracy"), "selected": i is not None and i == selected})
    return rows


COLUMNS = (("win_rate", "win rate vs SFT", 3), ("score", "oracle score", 3), ("exact", "exact", 3),
           ("length", "length", 1), ("reward_acc", "reward acc", 3), ("val_acc", "val acc", 3),
           ("judge_val_acc", "judge val acc", 3), ("judge_acc", "judge acc", 3))


def format_table(rows: list[dict], title: str | None = None) -> str:
    """The results table; the returned model is marked with '*'."""
    fmt = lambda v, p: "-" if v is None else (v if isinstance(v, str) else f"{v:.{p}f}")
    head = f"{'model':<15}" + "".join(f" {name:>{max(len(name), 6)}}" for _, name, _ in COLUMNS)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in rows:
        label = r["model"] + (" *" if r.get("selected") else "")
        lines.append(f"{label:<15}" + "".join(f" {fmt(r.get(k), p):>{max(len(name), 6)}}" for k, name, p in COLUMNS))
    if any(r.get("selected") for r in rows):
        lines.append("* the model the run returns (selected.json says why)")
    return "\n".join(lines)


def run_summary(output_dir: str, iterations: int, metrics: dict, plot: str | None = None) -> str:
    """The closing lines of `spa run`: the results table (when anything was evaluated), which model the run
    returns and why, and where the results and the plot are."""
    lines = []
    rows = results_table(output_dir, iterations)
    if rows:
        lines.append(format_table(rows, title="results (held-out evaluation)"))
    selected = metrics.get("selected")
    lay = Layout(output_dir)
    if selected:
        i = selected.get("iteration")
        model = lay.model(i) if i is not None else None
        why = re.sub(r"^returns iter_\d+/model ", "", selected.get("reason") or "")  # the path is said already
        lines.append(f"returned model: {model} {why}".rstrip())
    else:
        last = max((i for i in range(iterations + 1) if os.path.exists(lay.model(i))), default=None)
        if last is not None:
            lines.append(f"last model: {lay.model(last)}")
    lines.append(f"metrics: {lay.metrics}" + (f"; plot: {plot}" if plot else ""))
    return "\n".join(lines)


# transformers' own progress bars that say nothing a spa stage line does not (per save and per load of a model)
QUIET_BARS = ("Loading weights", "Writing model shards")
BENIGN_WARNINGS = ("mtime may not be reliable",)  # checkpoint ordering falls back to step numbers: what spa does


def _not_benign(record) -> bool:
    return not any(m in record.getMessage() for m in BENIGN_WARNINGS)


def quiet_transformers() -> None:
    """For the `spa` command: hides transformers' per-load / per-save progress bars (QUIET_BARS; download bars and
    everything else stay) and known-benign warnings (BENIGN_WARNINGS). Trainer log dicts are routed by
    spa.train.StageProgress."""
    import logging

    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):
        def hook(factory, args, kwargs):
            if kwargs.get("desc") in QUIET_BARS:
                return hf_logging.EmptyTqdm(*args, **kwargs)
            return factory(*args, **kwargs)

        hf_logging.set_tqdm_hook(hook)
    for name in ("transformers.trainer_utils", "transformers.trainer"):
        log = logging.getLogger(name)
        if _not_benign not in log.filters:
            log.addFilter(_not_benign)
    # peft reads this deprecated transformers property on every adapter load: a warning the user cannot act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    quiet_deepspeed_on_cpu()


def quiet_deepspeed_on_cpu() -> None:
    """Where DeepSpeed is installed, accelerate imports it inside every Trainer, and on a machine without a GPU it
    prints "Setting accelerator to CPU ..." on stdout, into the middle of the run's output. With no CUDA device it
    picks its CPU accelerator anyway; naming it (DS_ACCELERATOR=cpu, unless the user set one) does the same
    silently."""
    import importlib.util

    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
