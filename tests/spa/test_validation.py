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


def _validated(tmp_path, values: list[float], metric="reward_accuracy", **loop) -> Config:
    cfg = Config.from_dict({"output_dir": str(tmp_path), "loop": {"iterations": 3, "selection_metric": metric,
                                                                  **loop}})
    lay = Layout(cfg.output_dir)
    for i, v in enumerate(values):
        os.makedirs(lay.iter_dir(i), exist_ok=True)
        with open(lay.validation(i), "w") as f:
            json.dump({f"val/{metric}": v, "val/reward_accuracy": v, "val/reward_accuracy_ci_low": v - 0.1,
                       "val/reward_accuracy_ci_high": v + 0.1, "val/reward_accuracy_pairs": 40}, f)
    return cfg


def test_select_best_iteration_and_stop_early(tmp_path):
    cfg = _validated(tmp_path, [0.7, 0.75, 0.6])
    sel = select_iteration(cfg, 1)
    assert (sel.iteration, sel.value, sel.stopped_early) == (1, 0.75, False)
    sel = select_iteration(cfg, 2)  # iteration 2 is worse than 1: one iteration without improvement = patience 1
    assert (sel.iteration, sel.stopped_early, sel.model) == (1, True, Layout(cfg.output_dir).model(1))
    assert sel.values == {"0": 0.7, "1": 0.75, "2": 0.6}
    assert sel.reason == ("returns iter_1/model (SPA iter 1): the best validation reward_accuracy 0.750 (95% CI "
                          "0.65-0.85) on 40 held-out gold pairs among iterations 0-2 (0: 0.700, 1: 0.750, 2: 0.600); "
                          "stopped after iteration 2: 1 iteration(s) without improvement (loop.patience)")
    assert select_iteration(cfg.replace(**{"loop.patience": 2}), 2).stopped_early is False
    assert select_iteration(cfg.replace(**{"loop.patience": 0}), 2).stopped_early is False
    last = select_iteration(cfg.replace(**{"loop.select": "last"}), 2)
    assert (last.iteration, last.rule, last.stopped_early) == (2, "last", False)


def test_select_ties_and_lower_is_better(tmp_path):
    assert select_iteration(_validated(tmp_path / "a", [0.7, 0.7, 0.7]), 2).iteration == 0  # ties: the earlier
    loss = _validated(tmp_path / "b", [0.5, 0.4, 0.45], metric="dpo_loss", patience=0)
    assert select_iteration(loss, 2).iteration == 1  # the DPO loss: lower is better
    assert choose_iteration({0: 0.5, 1: float("nan"), 2: 0.4}, 0) == (0, False)  # NaN never wins
    assert choose_iteration({0: 0.7, 1: 0.6, 2: 0.5, 3: 0.4}, 1, iterations=3) == (0, False)  # the last: no stop
    assert choose_iteration({0: 0.7, 1: 0.6}, 1, iterations=3) == (0, True)
    margin = _validated(tmp_path / "c", [0.1, 0.3, 0.2], metric="reward_margin", patience=0)
    assert select_iteration(margin, 2).iteration == 1
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
