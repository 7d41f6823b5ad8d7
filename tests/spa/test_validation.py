"""Held-out gold validation: the interval, the agreement metrics, the warning, the choice of the returned model
and early stopping, each against numbers computed by hand."""

import json
import os

import pytest

from spa import Config
from spa.io import Layout
from spa.validation import (
    PAIR_METRICS,
    agreement,
    bootstrap_indices,
    choose_iteration,
    pair_values,
    select_iteration,
    standard_error,
    validation_metrics,
    warn_if_length_decides,
    warn_if_uninformative,
    wilson_interval,
    worse_probability,
)


def test_wilson_interval():
    # 8 of 10: p = 0.8, z = 1.96 -> centre 0.99208 / 1.38416, half 1.96 * sqrt(0.025604) / 1.38416
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi) and hi == pytest.approx(0.5 + 0.0962, abs=1e-4)


def test_agreement_counts_ties_as_half():
    m = agreement([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], "x")
    assert m["x"] == 0.625 and m["x_pairs"] == 4
    assert (m["x_ci_low"], m["x_ci_high"]) == wilson_interval(2.5, 4)


def test_warning_when_the_judge_cannot_be_told_from_chance(caplog):
    m = {"judge/validation_accuracy": 0.6, "judge/validation_accuracy_ci_low": 0.39,
         "judge/validation_accuracy_ci_high": 0.78, "judge/validation_accuracy_pairs": 20}
    msg = warn_if_uninformative(m, 2)
    assert msg.startswith("judge iter 2: the judge agrees with the gold label on 0.60 of 20 held-out seed pairs "
                          "(95% CI 0.39-0.78)")
    assert msg in caplog.text
    assert warn_if_uninformative({**m, "judge/validation_accuracy_ci_low": 0.51}, 2) is None
    assert warn_if_uninformative({}, 2) is None  # no validation pairs: nothing to say


def test_warning_when_length_decides_the_judgment(caplog):
    msg = warn_if_length_decides(0.02, 150, 1)
    assert msg.startswith("judge iter 1: the chosen response is the longer one in 98% of the 150 pairs")
    assert msg in caplog.text
    assert "shorter one in 95%" in warn_if_length_decides(0.95, 40, 3)
    assert warn_if_length_decides(0.5, 150, 1) is None and warn_if_length_decides(0.1, 150, 1) is None
    assert warn_if_length_decides(0.0, 19, 1) is None  # too few pairs to say
    assert warn_if_length_decides(None, 0, 1) is None


def _scores(chosen: list[float], rejected: list[float]) -> dict:
    """validation_pairs.json content: summed log-probs under the model, pi_init at 0, one token per response (so
    reward_margin = 0.1 * (chosen - rejected) per pair)."""
    n = len(chosen)
    return {"id": [str(k) for k in range(n)], "logp_chosen": chosen, "logp_rejected": rejected,
            "ref_logp_chosen": [0.0] * n, "ref_logp_rejected": [0.0] * n, "tokens_chosen": [1] * n,
            "tokens_rejected": [1] * n}


def _validated(tmp_path, per_iteration: list[dict], **loop) -> Config:
    cfg = Config.from_dict({"output_dir": str(tmp_path), "loop": {"iterations": 3, **loop}})
    lay = Layout(cfg.output_dir)
    for i, scores in enumerate(per_iteration):
        os.makedirs(lay.iter_dir(i), exist_ok=True)
        with open(lay.validation_pairs(i), "w") as f:
            json.dump(scores, f)
    return cfg


def _exact_worse_probability(diffs: list[int]) -> float:
    """P(the mean of a bootstrap resample of diffs (each -1, 0 or +1) is < 0) + P(= 0) / 2, exactly (multinomial)."""
    from math import comb

    n, neg, pos = len(diffs), diffs.count(-1) / len(diffs), diffs.count(1) / len(diffs)
    total = 0.0
    for a in range(n + 1):  # a draws of -1, b of +1, the rest 0
        for b in range(n + 1 - a):
            p = comb(n, a) * comb(n - a, b) * neg ** a * pos ** b * (1 - neg - pos) ** (n - a - b)
            total += p if a > b else p / 2 if a == b else 0.0
    return total


def test_worse_probability_is_the_bootstrap_probability():
    import torch

    diffs = [-1, -1, 1] + [0] * 17  # iteration 2 loses 2 pairs iteration 1 won, wins 1 it lost
    v1 = torch.tensor([1.0] * 15 + [0.0] * 5, dtype=torch.float64)
    v2 = v1 + torch.tensor(diffs[:2] + [0.0] * 13 + diffs[2:3] + [0.0] * 4, dtype=torch.float64)
    d = (v2 - v1).tolist()
    exact = _exact_worse_probability([int(x) for x in d])
    assert exact == pytest.approx(0.7135, abs=1e-3)  # worse in the mean, but inside the noise
    got = worse_probability(v2, v1, bootstrap_indices(20, resamples=20000), lower_is_better=False)
    assert got == pytest.approx(exact, abs=0.01)


def test_choose_the_latest_iteration_within_the_noise():
    import torch

    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    v0 = t([1.0] * 12 + [0.0] * 8)
    v1 = t([1.0] * 15 + [0.0] * 5)  # the best mean
    v2 = t([0.0, 0.0] + [1.0] * 13 + [1.0] + [0.0] * 4)  # 14 of 20: worse than v1 with P 0.71 (see above)
    ch = choose_iteration({0: v0, 1: v1, 2: v2}, confidence=0.9)
    assert (ch.iteration, ch.best, ch.stop) == (2, 1, False) and ch.worse[1] == 0.0
    assert ch.worse[2] == pytest.approx(0.7135, abs=0.03)
    assert ch.worse[0] > 0.9  # v0 loses 3 pairs v1 wins and wins none
    assert choose_iteration({0: v0, 1: v1, 2: v2}, confidence=0.5).iteration == 1  # 0.5: the best mean
    flipped = 1.0 - v1  # every pair reversed: 15 of v1's wins lost, 5 of its losses won
    ch = choose_iteration({0: v0, 1: v1, 2: flipped}, confidence=0.9, patience=1, iterations=3)
    assert (ch.iteration, ch.stop) == (1, True) and ch.worse[2] > 0.98
    assert not choose_iteration({0: v0, 1: v1, 2: flipped}, 0.9, patience=1, iterations=2).stop  # none remain
    assert not choose_iteration({0: v0, 1: v1, 2: flipped}, 0.9, patience=2, iterations=3).stop  # one, not two
    assert choose_iteration({0: v0, 1: flipped, 2: flipped}, 0.9, patience=2, iterations=3).stop
    # the DPO loss: lower is better
    loss = choose_iteration({0: t([0.5, 0.6]), 1: t([0.3, 0.4]), 2: t([0.9, 1.0])}, 0.9, lower_is_better=True)
    assert (loss.iteration, loss.best) == (1, 1) and loss.worse[2] == 1.0 and loss.worse[0] == 1.0
    # a NaN mean never wins and is never returned
    nan = choose_iteration({0: t([0.5, 0.6]), 1: t([float("nan"), 0.6])}, 0.9)
    assert (nan.iteration, nan.best, nan.worse[1]) == (0, 0, 1.0)
    # against the seed: the latest iteration not worse than DPO on the seed
    seed = choose_iteration({0: v0, 1: v1, 2: flipped}, 0.9, against="seed")
    assert seed.iteration == 1 and seed.worse[2] > 0.9 and seed.worse[0] == 0.0


def test_select_iteration_from_the_validation_files(tmp_path):
    # iteration 1 best by reward margin; iteration 2 a bit lower, inside the noise of 5 pairs
    its = [_scores([1.0, 2.0, 0.0, 1.0, 1.0], [0.0] * 5), _scores([3.0, 4.0, 2.0, 3.0, 3.0], [0.0] * 5),
           _scores([3.0, 3.0, 2.0, 4.0, 2.5], [0.0] * 5)]
    cfg = _validated(tmp_path, its, selection_metric="reward_margin")
    sel = select_iteration(cfg, 2)
    assert (sel.iteration, sel.best, sel.rule, sel.metric, sel.pairs) == (2, 1, "best", "reward_margin", 5)
    assert sel.values == pytest.approx({"0": 0.1, "1": 0.3, "2": 0.29}) and sel.value == pytest.approx(0.29)
    assert sel.model == Layout(cfg.output_dir).model(2) and sel.confidence == 0.9 and not sel.stopped_early
    assert set(sel.standard_errors) == {"0", "1", "2"} and sel.worse_probability["0"] == 1.0
    assert sel.reason.startswith(
        "returns iter_2/model (SPA iter 2): the latest iteration whose validation reward_margin, 0.290 ± 0.0")
    assert "is not worse than the best (iter_1: 0.300 ± 0.0" in sel.reason and "on 5 held-out gold pairs" in sel.reason
    # the metric is read from the configured key: by accuracy, iterations 1 and 2 rank all 5 pairs right, iteration 0
    # ties one (0 vs 0: 1/2)
    acc = select_iteration(cfg.replace(**{"loop.selection_metric": "reward_accuracy"}), 2)
    assert acc.values == {"0": 0.9, "1": 1.0, "2": 1.0} and (acc.iteration, acc.best) == (2, 1)
    # chosen_logp_per_token: iteration 1's chosen responses are the likeliest by far
    likely = select_iteration(cfg.replace(**{"loop.selection_metric": "chosen_logp_per_token"}), 2)
    assert likely.values == pytest.approx({"0": 1.0, "1": 3.0, "2": 2.9}) and likely.best == 1
    last = select_iteration(cfg.replace(**{"loop.select": "last"}), 2)
    assert (last.iteration, last.rule, last.stopped_early) == (2, "last", False)
    none = select_iteration(Config.from_dict({"output_dir": str(tmp_path / "d"),
                                              "data": {"validation_size": 0}}), 1)
    assert none.iteration == 1 and "no validation pairs" in none.reason


# Two held-out pairs by hand (beta 0.1): chosen/rejected summed log-probs under the model and pi_init, token counts.
SCORES = {"id": ["a", "b"], "logp_chosen": [-2.0, -6.0], "logp_rejected": [-4.0, -3.0],
          "ref_logp_chosen": [-3.0, -5.0], "ref_logp_rejected": [-3.0, -3.0], "tokens_chosen": [2, 3],
          "tokens_rejected": [4, 1]}
BY_HAND = {  # per pair: (a, b)
    "reward_accuracy": [1.0, 0.0],  # rewards 0.1 vs -0.1; -0.1 vs 0.0
    "reward_margin": [0.2, -0.1],
    "dpo_loss": [0.5981388693815918, 0.7443966600735709],  # -logsigmoid(0.2), -logsigmoid(-0.1)
    "logp_accuracy": [1.0, 0.0],
    "logp_per_token_accuracy": [0.5, 1.0],  # a: -2/2 = -4/4, a tie counts 1/2; b: -6/3 > -3/1
    "chosen_logp_per_token": [-1.0, -2.0],
    "logp_margin": [2.0, -3.0],
    "logp_per_token_margin": [0.0, 1.0],  # -1 - (-1); -2 - (-3)
}


def test_pair_values_by_hand():
    assert set(BY_HAND) == set(PAIR_METRICS)
    for metric, want in BY_HAND.items():
        assert pair_values(SCORES, metric, 0.1).tolist() == pytest.approx(want), metric
    m = validation_metrics(SCORES, 0.1)
    for metric, want in BY_HAND.items():
        assert m[f"val/{metric}"] == pytest.approx(sum(want) / 2), metric
        assert m[f"val/{metric}_se"] > 0, metric
    assert m["val/reward_accuracy_pairs"] == 2
    with pytest.raises(ValueError, match="unknown validation metric 'nope'"):
        pair_values(SCORES, "nope", 0.1)


def test_bootstrap_noise_and_paired_comparison():
    import torch

    idx = bootstrap_indices(400, resamples=4000, seed=3)
    assert idx.shape == (4000, 400) and torch.equal(idx, bootstrap_indices(400, resamples=4000, seed=3))
    v = torch.arange(400, dtype=torch.float64) % 2  # a proportion of 1/2 over 400 pairs: SE sqrt(0.25 / 400)
    assert standard_error(v, idx) == pytest.approx(0.025, rel=0.05)
    # paired: b is a shifted by a constant, so b is worse in every resample however noisy a is
    a = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert worse_probability(a - 0.01, a, idx, lower_is_better=False) == 1.0
    assert worse_probability(a + 0.01, a, idx, lower_is_better=False) == 0.0
    assert worse_probability(a + 0.01, a, idx, lower_is_better=True) == 1.0
    assert worse_probability(a, a, idx, lower_is_better=False) == 0.5  # equal: every resample a tie
    # unpaired noise of the same size: an even chance either way
    c = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert 0.02 < worse_probability(c, a, idx, lower_is_better=False) < 0.98
