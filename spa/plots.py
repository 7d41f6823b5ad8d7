"""Plots of a run's results: win rate against the SFT model, oracle score, the judge's agreement with the oracle
and the validation reward accuracy, per model (SFT, DPO on the seed, each SPA iteration).

    spa.plots.plot_run("runs/x", iterations=3)          # runs/x/results.png (what `spa run` writes)
    spa.plots.plot_results(rows, "results.png")         # rows: spa.report.results_table(...) or the demo's mean_std

matplotlib is optional: without it nothing is drawn and a one-line warning says how to get it. The figure is drawn
with the Agg canvas directly, so no GUI backend is needed and the caller's pyplot backend is left alone.
"""

from __future__ import annotations

import logging
import os

from .report import results_table

logger = logging.getLogger("spa")

SERIES = (("win_rate", "win rate vs SFT (ties 1/2)", "o-"), ("score", "oracle score", "s-"),
          ("judge_acc", "judge agreement with the oracle (ties 1/2)", "^--"),
          ("val_acc", "reward accuracy, held-out seed pairs", "d:"))
MISSING_MATPLOTLIB = "matplotlib is not installed, so no plot was written ({path}); `pip install matplotlib` adds it"


def plot_results(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """Draws the rows' metrics per model into the PNG `path` (error bars where a row has `<metric>_std`, the
    returned model marked); returns the path, or None when matplotlib is missing or nothing was measured."""
    rows = [r for r in rows if r.get("model") != "returned"]
    series = [(k, label, style) for k, label, style in SERIES if any(r.get(k) is not None for r in rows)]
    if not series:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(MISSING_MATPLOTLIB.format(path=path))
        return None
    fig = Figure(figsize=(max(5.0, 1.2 * len(rows) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    for key, label, style in series:
        pts = [(i, r[key], r.get(f"{key}_std")) for i, r in zip(x, rows) if r.get(key) is not None]
        xs, ys, err = zip(*pts)
        has_err = any(e for e in err)
        ax.errorbar(xs, ys, yerr=[e or 0.0 for e in err] if has_err else None, fmt=style, capsize=3, label=label)
    for i, r in zip(x, rows):
        if r.get("selected"):
            ax.axvline(i, color="0.6", lw=8, alpha=0.25, zorder=0, label="the model the run returns")
    ax.set_xticks(x, [r["model"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="0.8", lw=0.8, zorder=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "results per model (held-out evaluation)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def plot_run(output_dir: str, iterations: int) -> str | None:
    """output_dir/results.png from the run's evaluation (spa.report.results_table); None when nothing to draw."""
    rows = results_table(output_dir, iterations)
    return plot_results(rows, os.path.join(output_dir, "results.png"),
                        title=f"{os.path.basename(os.path.abspath(output_dir))}: results per model") if rows else None
