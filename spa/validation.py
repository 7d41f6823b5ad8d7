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
class Choice:
    iteration: int  # the one returned
    best: int  # the one with the best mean
    worse: dict[int, float]  # iteration -> paired-bootstrap probability that it validates worse than the reference
    stop: bool  # the last `patience` iterations each validate worse than the best beyond the noise


def choose_iteration(values: dict[int, torch.Tensor], confidence: float, lower_is_better: bool = False,
                     patience: int = 0, iterations: int | None = None, against: str = "best",
                     resamples: int = 2000) -> Choice:
    """The noise-aware choice among validated iterations. values: iteration -> the per-pair values of the selection
    metric on the same held-out pairs. An iteration counts as worse than another only when a paired bootstrap over
    the pairs says so with probability >= confidence; the choice is the latest iteration not worse than `against`
    ("best": the iteration with the best mean, ties to the earlier; "seed": iteration 0), so a later iteration is
    never passed over on a difference inside the noise. stop: patience > 0, iterations remain, and each of the last
    `patience` iterations is worse than the best beyond the noise (evidence that the loop got worse, not a lack of
    evidence that it got better). A non-finite mean never wins and is never returned while another is finite."""
    its = sorted(values)
    sign = -1.0 if lower_is_better else 1.0
    means = {i: sign * values[i].mean().item() for i in its}
    finite = [i for i in its if math.isfinite(means[i])] or its
    best = max(finite, key=lambda i: (means[i], -i))
    idx = bootstrap_indices(len(values[best]), resamples)

    def worse_than(ref: int) -> dict[int, float]:
        return {i: 0.0 if i == ref else 1.0 if i not in finite else
                worse_probability(values[i], values[ref], idx, lower_is_better) for i in its}

    to_best = worse_than(best)
    ref = best if against == "best" else its[0]
    worse = to_best if ref == best else worse_than(ref)
    chosen = max(i for i in finite if worse[i] < confidence or i == ref)
    stop = (patience > 0 and len(its) > patience and (iterations is None or its[-1] < iterations)
            and all(to_best[i] >= confidence for i in its[-patience:]))
    return Choice(chosen, best, worse, stop)


@dataclass
class Selection:
    iteration: int  # the returned model is iter_<iteration>/model
    model: str
    rule: str  # "best" or "last"
    metric: str | None
    value: float | None  # the returned iteration's validation metric
    values: dict[str, float]  # iteration -> validation metric, for every validated iteration
    standard_errors: dict[str, float]  # iteration -> its bootstrap standard error
    worse_probability: dict[str, float]  # iteration -> P(it validates worse than the best one), paired bootstrap
    confidence: float | None  # loop.selection_confidence
    best: int | None  # the iteration with the best validation mean
    pairs: int | None  # held-out gold pairs behind the numbers
    stopped_early: bool
    reason: str  # one line a user can read

    def to_dict(self) -> dict:
        return asdict(self)


def model_label(iteration: int) -> str:
    return "DPO on seed" if iteration == 0 else f"SPA iter {iteration}"


def select_iteration(cfg, last: int) -> Selection:
    """The model the run returns after iterations 0..last are done (validated when loop.select=best), and whether
    the loop stops early there (choose_iteration with loop.selection_metric, loop.selection_confidence and
    loop.patience, on the per-pair values of iter_<i>/validation_pairs.json)."""
    lay = Layout(cfg.output_dir)
    lp = cfg.loop
    values = {}
    if lp.select == "best":
        for i in range(last + 1):
            if os.path.exists(lay.validation_pairs(i)):
                values[i] = pair_values(read_json(lay.validation_pairs(i)), lp.selection_metric, cfg.train.beta)
    if not values:
        why = ("loop.select=last" if lp.select == "last" else "no validation pairs (data.validation_size=0)"
               if cfg.data.validation_size == 0 else "no validate stage has run")
        return Selection(last, lay.model(last), "last", None, None, {}, {}, {}, None, None, None, False,
                         f"returns iter_{last}/model ({model_label(last)}), the last iteration ({why})")
    low = lp.selection_metric in LOWER_IS_BETTER
    ch = choose_iteration(values, lp.selection_confidence, low, lp.patience, lp.iterations)
    idx = bootstrap_indices(len(values[ch.best]))
    means = {i: v.mean().item() for i, v in values.items()}
    ses = {i: standard_error(v, idx) for i, v in values.items()}
    show = lambda i: f"{means[i]:.3f} ± {ses[i]:.3f}"
    pick, pairs = ch.iteration, len(values[ch.best])
    if pick == ch.best:
        why = f"the best validation {lp.selection_metric}, {show(pick)}"
    else:
        why = (f"the latest iteration whose validation {lp.selection_metric}, {show(pick)}, is not worse than the "
               f"best (iter_{ch.best}: {show(ch.best)}) beyond the noise (P(worse) {ch.worse[pick]:.2f} < "
               f"{lp.selection_confidence})")
    later = [i for i in values if i > pick]
    if later:
        why += "; " + ", ".join(f"iter_{i} is worse with P {ch.worse[i]:.2f}" for i in later)
    reason = (f"returns iter_{pick}/model ({model_label(pick)}): {why}, on {pairs} held-out gold pairs (mean ± "
              "bootstrap SE per iteration: " + ", ".join(f"{i}: {show(i)}" for i in values) + ")")
    if ch.stop:
        reason += (f"; stopped after iteration {last}: the last {lp.patience} iteration(s) validate worse than "
                   f"iter_{ch.best} with P >= {lp.selection_confidence} (loop.patience)")
    key = lambda d: {str(i): x for i, x in d.items()}
    return Selection(pick, lay.model(pick), "best", lp.selection_metric, means[pick], key(means), key(ses),
                     key(ch.worse), lp.selection_confidence, ch.best, pairs, ch.stop, reason)


__all__ = ["wilson_interval", "agreement", "validation_rows", "judge_validation", "warn_if_uninformative",
           "warn_if_length_decides", "PAIR_METRICS", "LOWER_IS_BETTER", "pair_values", "bootstrap_indices",
           "standard_error", "worse_probability", "validation_scores", "validation_metrics", "model_validation",
           "Choice", "choose_iteration", "Selection", "select_iteration"]
