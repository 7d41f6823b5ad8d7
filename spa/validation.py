"""Held-out gold validation: the check the loop makes of its models and of its judge, and the choice of the model a
run returns.

The seed's gold pairs are the only gold signal a run has, so data.validation_size of them are held out of training
(spa.data.seed_and_pools). On these pairs:
  - every iteration's model pi_i is measured (the `validate` stage, spa.stages.validate.run_validate, writes
    iter_<i>/validation.json): its implicit reward
    beta * (log pi_i(y|x) - log pi_init(y|x)) with the fixed reference pi_init, so that all iterations are on one
    scale: accuracy (chosen scored above rejected, ties 1/2, with a 95% Wilson interval), mean reward margin, and
    DPO loss; and, without a reference, how often pi_i's own log-prob (summed, and per token) prefers the chosen
    response, and the mean per-token log-likelihood of the chosen responses (the default selection metric: over the
    built-in tasks it ranks iterations as the gold oracle does best);
  - the judge of every iteration is applied to each held-out (chosen, rejected) pair exactly as to generated pairs
    (in the judge stage: judge/validation_accuracy), and a warning says when it cannot be told from chance; another
    says when the judge's choices are decided by length (warn_if_length_decides).
The run returns the iteration (0 = DPO on the seed, included) with the best loop.selection_metric, and stops after
loop.patience iterations in a row without improvement (select_iteration); loop.select=last returns the last one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from . import data as data_mod
from .io import Layout, read_json
from .oracle import pairwise_win
from .scoring import score_sequences

logger = logging.getLogger("spa")

def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties counted as half a success)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(chosen: list[float], rejected: list[float], prefix: str) -> dict:
    """How often scores put the gold chosen response above the rejected one (ties 1/2), with its interval."""
    wins = [pairwise_win(c, r) for c, r in zip(chosen, rejected)]
    n = len(wins)
    acc = sum(wins) / n if n else None
    lo, hi = wilson_interval(sum(wins), n)
    return {f"{prefix}": acc, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi, f"{prefix}_pairs": n}


def validation_rows(cfg, enc: data_mod.PromptEncoder) -> list[dict]:
    """The held-out gold pairs as judge rows {"id", "prompt", "responses": [chosen, rejected]} (prompts the
    long-prompt rule skips are left out)."""
    _, validation, _, _ = data_mod.seed_and_pools(cfg)
    return [{"id": p["id"], "prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]} for p in validation
            if enc.encode(p["prompt"]) is not None]


def judge_validation(scores: list[list[float]]) -> dict:
    """judge/validation_* metrics from the judge's (adjusted) scores of validation_rows."""
    return agreement([s[0] for s in scores], [s[1] for s in scores], "judge/validation_accuracy")


def warn_if_uninformative(metrics: dict, iteration: int) -> str | None:
    """A warning (logged and returned) when the judge's agreement with the held-out gold labels is not clearly
    above chance: the lower end of its 95% interval at or below 1/2."""
    acc, lo, hi, n = (metrics.get(f"judge/validation_accuracy{s}") for s in ("", "_ci_low", "_ci_high", "_pairs"))
    if not n or lo > 0.5:
        return None
    msg = (f"judge iter {iteration}: the judge agrees with the gold label on {acc:.2f} of {n} held-out seed pairs "
           f"(95% CI {lo:.2f}-{hi:.2f}): it cannot be told from chance, so this iteration's labels may carry little "
           "or inverse signal; loop.select=best will keep an earlier model if this iteration's model validates worse")
    logger.warning(msg)
    return msg


def warn_if_length_decides(chosen_shorter: float | None, pairs: int, iteration: int, limit: float = 0.1) -> str | None:
    """A warning (logged and returned) when the judge picks the shorter (or the longer) response in more than
    1 - limit of the pairs whose responses differ in length (at least 20 such pairs): its labels then mostly teach
    a length, which is how a self-judging loop drifts to ever shorter or longer answers."""
    if chosen_shorter is None or pairs < 20 or limit <= chosen_shorter <= 1 - limit:
        return None
    side, frac = ("shorter", chosen_shorter) if chosen_shorter > 0.5 else ("longer", 1 - chosen_shorter)
    msg = (f"judge iter {iteration}: the chosen response is the {side} one in {frac:.0%} of the {pairs} pairs whose "
           "responses differ in length: the labels mostly teach a length (judge.length_regress or "
           "judge.length_penalty counter it; loop.select=best keeps an earlier model if this one validates worse)")
    logger.warning(msg)
    return msg


@torch.inference_mode()
def validation_scores(model, reference, enc: data_mod.PromptEncoder, rows: list[dict], batch_size: int,
                      impl: str) -> dict[str, list]:
    """Per held-out pair (validation_rows' order): its id, the summed log-probs of the chosen and the rejected
    response under `model` and under `reference` (pi_init), and their token counts. Every validation metric is a
    mean over pairs of a function of these, so they are kept (iter_<i>/validation_pairs.json) for the uncertainty
    of every metric and for paired comparisons between iterations."""
    items = [(enc.encode(r["prompt"]), enc.encode_response(y)) for r in rows for y in r["responses"]]
    pad = enc.tokenizer.pad_token_id
    lp = score_sequences(model, items, pad, batch_size, impl).tolist()
    ref = score_sequences(reference, items, pad, batch_size, impl).tolist()
    tokens = [len(y) for _, y in items]
    return {"id": [r["id"] for r in rows], "logp_chosen": lp[0::2], "logp_rejected": lp[1::2],
            "ref_logp_chosen": ref[0::2], "ref_logp_rejected": ref[1::2], "tokens_chosen": tokens[0::2],
            "tokens_rejected": tokens[1::2]}


PAIR_METRICS = ("reward_accuracy", "reward_margin", "dpo_loss", "logp_accuracy", "logp_per_token_accuracy",
                "chosen_logp_per_token", "logp_margin", "logp_per_token_margin")
LOWER_IS_BETTER = {"dpo_loss"}


def _win(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a > b, 1/2 on a tie, else 0 (pairwise_win, elementwise)."""
    return (a > b).double() + 0.5 * (a == b).double()


def pair_values(scores: dict[str, list], metric: str, beta: float) -> torch.Tensor:
    """The per-pair values [pairs] (float64) whose mean is validation metric `metric`, from validation_scores."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items() if k != "id"}
    lc, lr = t["logp_chosen"], t["logp_rejected"]
    rc, rr = beta * (lc - t["ref_logp_chosen"]), beta * (lr - t["ref_logp_rejected"])
    pc, pr = lc / t["tokens_chosen"], lr / t["tokens_rejected"]
    values = {"reward_accuracy": lambda: _win(rc, rr), "reward_margin": lambda: rc - rr,
              "dpo_loss": lambda: -torch.nn.functional.logsigmoid(rc - rr), "logp_accuracy": lambda: _win(lc, lr),
              "logp_per_token_accuracy": lambda: _win(pc, pr), "chosen_logp_per_token": lambda: pc,
              "logp_margin": lambda: lc - lr, "logp_per_token_margin": lambda: pc - pr}
    if metric not in values:
        raise ValueError(f"unknown validation metric {metric!r}; known: {', '.join(PAIR_METRICS)}")
    return values[metric]()


def bootstrap_indices(pairs: int, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """[resamples, pairs] indices of a seeded bootstrap over the held-out pairs; the same rows serve every iteration,
    so that differences between iterations are paired."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(pairs, (resamples, pairs), generator=g)


def standard_error(values: torch.Tensor, idx: torch.Tensor) -> float:
    """Bootstrap standard error of the mean of values."""
    return values[idx].mean(1).std().item() if len(values) > 1 else float("nan")


def worse_probability(values: torch.Tensor, best: torch.Tensor, idx: torch.Tensor, lower_is_better: bool) -> float:
    """Paired bootstrap: the fraction of resamples in which the mean of `values` is worse than the mean of `best`
    (ties count half)."""
    d = values[idx].mean(1) - best[idx].mean(1)
    d = -d if lower_is_better else d
    return ((d < 0).double().mean() + 0.5 * (d == 0).double().mean()).item()


def validation_metrics(scores: dict[str, list], beta: float, resamples: int = 2000) -> dict:
    """val/<metric> for every PAIR_METRICS name (the mean of its per-pair values) with val/<metric>_se, its bootstrap
    standard error over the held-out pairs; the accuracies also with a 95% Wilson interval (_ci_low, _ci_high) and
    their pair count (_pairs)."""
    out = {}
    idx = bootstrap_indices(len(scores["id"]), resamples)
    for m in PAIR_METRICS:
        v = pair_values(scores, m, beta)
        out[f"val/{m}"] = v.mean().item()
        out[f"val/{m}_se"] = standard_error(v, idx)
        if m.endswith("accuracy"):
            lo, hi = wilson_interval(v.sum().item(), len(v))
            out.update({f"val/{m}_ci_low": lo, f"val/{m}_ci_high": hi, f"val/{m}_pairs": len(v)})
    return out


def model_validation(model, reference, enc: data_mod.PromptEncoder, rows: list[dict], beta: float,
                     batch_size: int, impl: str) -> dict:
    """val/... metrics of `model` on validation_rows (reference: pi_init)."""
    return validation_metrics(validation_scores(model, reference, enc, rows, batch_size, impl), beta)


@dataclass
class Selection:
    iteration: int  # the returned model is iter_<iteration>/model
    model: str
    rule: str  # "best" or "last"
    metric: str | None
    value: float | None
    values: dict[str, float]  # iteration -> validation metric, for every validated iteration
    stopped_early: bool
    reason: str  # one line a user can read

    def to_dict(self) -> dict:
        return asdict(self)


def model_label(iteration: int) -> str:
    return "DPO on seed" if iteration == 0 else f"SPA iter {iteration}"


def choose_iteration(values: dict[int, float], patience: int, lower_is_better: bool = False,
                     iterations: int | None = None) -> tuple[int, bool]:
    """(best iteration, whether to stop after the last one in `values`): the best value, ties to the earlier
    iteration; stop when the last `patience` iterations (> 0) brought no better value and iterations remain."""
    sign = -1.0 if lower_is_better else 1.0
    finite = [i for i in values if math.isfinite(values[i])] or list(values)  # a NaN metric never wins
    best = max(finite, key=lambda i: (sign * values[i], -i))
    last = max(values)
    stopped = patience > 0 and last - best >= patience and (iterations is None or last < iterations)
    return best, stopped


def select_iteration(cfg, last: int) -> Selection:
    """The model the run returns after iterations 0..last are done (validated when loop.select=best), and whether
    the loop stops early there (loop.patience iterations in a row without a better validation metric)."""
    lay = Layout(cfg.output_dir)
    lp = cfg.loop
    key = f"val/{lp.selection_metric}"
    values = {}
    for i in range(last + 1):
        path = lay.validation(i) if lp.select == "best" else ""
        if os.path.exists(path):
            values[i] = read_json(path)[key]
    if not values:
        why = ("loop.select=last" if lp.select == "last" else "no validation pairs (data.validation_size=0)"
               if cfg.data.validation_size == 0 else "no validate stage has run")
        return Selection(last, lay.model(last), "last", None, None, {}, False,
                         f"returns iter_{last}/model ({model_label(last)}), the last iteration ({why})")
    best, stopped = choose_iteration(values, lp.patience, lp.selection_metric in LOWER_IS_BETTER, lp.iterations)
    since = last - best
    v = read_json(lay.validation(best))
    ci = f" (95% CI {v[key + '_ci_low']:.2f}-{v[key + '_ci_high']:.2f})" if key + "_ci_low" in v else ""
    reason = (f"returns iter_{best}/model ({model_label(best)}): the best validation {lp.selection_metric} "
              f"{values[best]:.3f}{ci} on {v['val/reward_accuracy_pairs']} held-out gold pairs among iterations "
              f"0-{last} (" + ", ".join(f"{i}: {x:.3f}" for i, x in values.items()) + ")")
    if stopped:
        reason += f"; stopped after iteration {last}: {since} iteration(s) without improvement (loop.patience)"
    return Selection(best, lay.model(best), "best", lp.selection_metric, values[best],
                     {str(i): x for i, x in values.items()}, stopped, reason)


__all__ = ["wilson_interval", "agreement", "validation_rows", "judge_validation", "warn_if_uninformative",
           "warn_if_length_decides", "PAIR_METRICS", "LOWER_IS_BETTER", "pair_values", "bootstrap_indices",
           "standard_error", "worse_probability", "validation_scores", "validation_metrics", "model_validation",
           "Selection",
           "choose_iteration", "select_iteration"]
