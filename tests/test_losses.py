"""preference_loss: every loss type against hand-derived formulas and TRL's published ones."""

import math

import pytest
import torch
import torch.nn.functional as F

import spa_kernels as sk


def logsig(x):
    return -math.log1p(math.exp(-x))


def vecs(B=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return [(-20 * torch.rand(B, generator=g, dtype=dtype)) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hand_derived_values_on_one_pair(beta):
    pc, pr, rc, rr = -10.0, -14.0, -11.0, -12.0
    h = (pc - rc) - (pr - rr)  # 1 - (-2) = 3
    t = lambda *xs: torch.tensor(xs, dtype=torch.float64)
    args = (t(pc), t(pr), t(rc), t(rr))
    cases = {
        ("sigmoid", 0.0): -logsig(beta * h),
        ("sigmoid", 0.2): -0.8 * logsig(beta * h) - 0.2 * logsig(-beta * h),
        ("robust", 0.2): (-0.8 * logsig(beta * h) + 0.2 * logsig(-beta * h)) / 0.6,
        ("ipo", 0.0): (h - 1 / (2 * beta)) ** 2,
        ("hinge", 0.0): max(0.0, 1 - beta * h),
    }
    for (lt, eps), want in cases.items():
        out = sk.preference_loss(*args, beta=beta, loss_type=lt, label_smoothing=eps)
        assert out.loss.item() == pytest.approx(want, rel=1e-12), (lt, eps)
        assert out.chosen_rewards.item() == pytest.approx(beta * (pc - rc))
        assert out.rejected_rewards.item() == pytest.approx(beta * (pr - rr))
    for z, want in [(0.0, -logsig(beta * h)), (1.0, -0.9 * logsig(beta * h) - 0.1 * logsig(-beta * h))]:
        out = sk.preference_loss(*args, beta=beta, loss_type="spa", noisy=t(z), refine_alpha=0.1)
        assert out.loss.item() == pytest.approx(want, rel=1e-12)
    out = sk.preference_loss(*args, beta=beta, loss_type="dlma", margin=t(0.2 * 40))  # R clamped at 40, gamma 0.2
    assert out.loss.item() == pytest.approx(-logsig(beta * (h - 8.0)), rel=1e-12)
    out = sk.preference_loss(t(pc), t(pr), None, None, beta=beta, loss_type="simpo", simpo_gamma=0.5)
    assert out.loss.item() == pytest.approx(-logsig(beta * (pc - pr) - 0.5), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * pc)


def trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """The expressions of TRL's DPOTrainer (trl 1.x, `_compute_loss`; `dpo_loss` in 0.x for cDPO's sigmoid)."""
    logits = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                - F.logsigmoid(-beta * logits) * label_smoothing)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
        flipped = -label_smoothing * F.logsigmoid(-beta * logits)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def trl_cpo_simpo_loss(pc, pr, beta, gamma, label_smoothing):
    """TRL's CPOTrainer, loss_type="simpo"."""
    logits = (pc - pr) - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_trl_formulas(loss_type, label_smoothing):
    if label_smoothing and loss_type in ("hinge", "ipo"):
        pytest.skip("label smoothing only applies to sigmoid / robust")
    pc, pr, rc, rr = vecs()
    out = sk.preference_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing,
                             reduction="none")
    torch.testing.assert_close(out.losses, trl_dpo_loss(pc, pr, rc, rr, 0.3, loss_type, label_smoothing))
    torch.testing.assert_close(out.loss, out.losses)


def test_simpo_matches_trl_cpo():
    pc, pr, _, _ = vecs()
    out = sk.preference_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.2, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, trl_cpo_simpo_loss(pc, pr, 2.0, 1.2, 0.1))


@pytest.mark.parametrize("loss_type", sk.LOSS_TYPES)
def test_gradcheck_and_reductions(loss_type):
    pc, pr, rc, rr = (v.requires_grad_() for v in vecs(5))
    kw = {}
    if loss_type == "spa":
        kw["noisy"] = torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool)
    if loss_type == "dlma":
        kw["margin"] = sk.dlma_margin(torch.tensor([100.0, -3.0, 0.5, -80.0, 2.0], dtype=torch.float64))
    ref = (rc, rr) if loss_type != "simpo" else (None, None)
    inputs = (pc, pr) + tuple(r for r in ref if r is not None)

    def fn(*xs):
        if loss_type == "simpo":
            return sk.preference_loss(xs[0], xs[1], None, None, loss_type=loss_type, **kw).loss
        return sk.preference_loss(*xs, loss_type=loss_type, **kw).loss

    assert torch.autograd.gradcheck(fn, inputs)
    none = sk.preference_loss(pc, pr, *ref, loss_type=loss_type, reduction="none", **kw)
    mean = sk.preference_loss(pc, pr, *ref, loss_type=loss_type, **kw)
    total = sk.preference_loss(pc, pr, *ref, loss_type=loss_type, reduction="sum", **kw)
    torch.testing.assert_close(mean.loss, none.losses.mean())
    torch.testing.assert_close(total.loss, none.losses.sum())
    assert not none.chosen_rewards.requires_grad


def test_spa_loss_with_no_noisy_pairs_equals_dpo_and_dlma_margin_clamps():
    pc, pr, rc, rr = vecs()
    spa = sk.preference_loss(pc, pr, rc, rr, loss_type="spa", noisy=torch.zeros(6, dtype=torch.bool))
    dpo = sk.preference_loss(pc, pr, rc, rr, loss_type="sigmoid")
    torch.testing.assert_close(spa.loss, dpo.loss)
    assert sk.dlma_margin(torch.tensor([1e3, -1e3, 5.0])).tolist() == pytest.approx([8.0, -8.0, 1.0])


def test_bf16_inputs_compute_in_float32():
    pc, pr, rc, rr = (v.float() for v in vecs())
    out32 = sk.preference_loss(pc, pr, rc, rr)
    out16 = sk.preference_loss(*(v.bfloat16() for v in (pc, pr, rc, rr)))
    assert out16.loss.dtype == torch.float32
    assert out16.loss.item() == pytest.approx(out32.loss.item(), rel=2e-2)


def test_metrics_use_trl_names():
    pc, pr, rc, rr = vecs()
    m = sk.preference_loss(pc, pr, rc, rr, beta=0.1).metrics(prefix="train/")
    assert set(m) == {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                      "train/rewards/margins"}
    cr, rr_ = 0.1 * (pc - rc), 0.1 * (pr - rr)
    assert m["train/rewards/margins"] == pytest.approx((cr - rr_).mean().item())
    assert m["train/rewards/accuracies"] == pytest.approx((cr > rr_).double().mean().item())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(loss_type="kto"), ValueError, "loss_type='kto' is not one of"),
    (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing applies to"),
    (dict(loss_type="spa"), ValueError, "noisy"),
    (dict(loss_type="dlma"), ValueError, "margin"),
    (dict(margin=torch.zeros(6)), ValueError, "margin is used by loss_type='dlma' only"),
    (dict(noisy=torch.zeros(6)), ValueError, "noisy is used by loss_type='spa' only"),
    (dict(reduction="max"), ValueError, "reduction='max'"),
])
def test_errors(kwargs, exc, match):
    pc, pr, rc, rr = vecs()
    with pytest.raises(exc, match=match):
        sk.preference_loss(pc, pr, rc, rr, **kwargs)


def test_shape_errors():
    pc, pr, rc, rr = vecs()
    with pytest.raises(ValueError, match="rejected_logps has 5 entries but chosen_logps has 6"):
        sk.preference_loss(pc, pr[:5], rc, rr)
    with pytest.raises(ValueError, match=r"must be a \[B\] vector"):
        sk.preference_loss(pc[None], pr, rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        sk.preference_loss(pc, pr, None, None, loss_type="sigmoid")


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=float("inf")), "beta must be a finite number > 0"),
    (dict(beta=float("nan")), "beta must be a finite number > 0"),
    (dict(beta=-0.1), "beta must be a finite number > 0"),
    (dict(beta=True), "beta must be a real number"),
    (dict(beta="0.1"), "beta must be a real number"),
    (dict(loss_type="spa", noisy=torch.zeros(6, dtype=torch.bool), refine_alpha=1.5), r"refine_alpha .* \[0, 1\]"),
    (dict(loss_type="spa", noisy=torch.zeros(6, dtype=torch.bool), refine_alpha=-0.1), r"refine_alpha .* \[0, 1\]"),
    (dict(loss_type="spa", noisy=torch.zeros(6, dtype=torch.bool), refine_alpha=float("nan")), "refine_alpha"),
    (dict(loss_type="spa", noisy=torch.full((6,), 0.5)), "noisy must be a bool mask"),
    (dict(loss_type="spa", noisy=torch.tensor([0, 1, 2, 0, 1, 0])), "noisy must be a bool mask"),
    (dict(loss_type="spa", noisy=torch.full((6,), float("nan"))), "noisy must be a bool mask"),
])
def test_argument_errors_name_the_argument(kwargs, match):
    pc, pr, rc, rr = vecs()
    with pytest.raises(ValueError, match=match):
        sk.preference_loss(pc, pr, rc, rr, **kwargs)


def test_noisy_accepts_bool_and_exact_zero_one_numbers():
    pc, pr, rc, rr = vecs()
    mask = torch.tensor([True, False, True, False, False, True])
    want = sk.preference_loss(pc, pr, rc, rr, loss_type="spa", noisy=mask, refine_alpha=0.3).losses
    for z in (mask.double(), mask.float(), mask.long()):
        got = sk.preference_loss(pc, pr, rc, rr, loss_type="spa", noisy=z, refine_alpha=0.3).losses
        torch.testing.assert_close(got, want)
    for a in (0.0, 1.0, torch.tensor(0.5)):
        sk.preference_loss(pc, pr, rc, rr, loss_type="spa", noisy=mask, refine_alpha=a)


@pytest.mark.parametrize("refs", ["both", "chosen", "rejected"])
def test_simpo_rejects_reference_logps(refs):
    pc, pr, rc, rr = vecs()
    ref = {"both": (rc, rr), "chosen": (rc, None), "rejected": (None, rr)}[refs]
    with pytest.raises(ValueError, match="simpo' is reference-free"):
        sk.preference_loss(pc, pr, *ref, loss_type="simpo")
