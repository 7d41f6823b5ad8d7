"""FusedLinearPreferenceLoss against the composition hidden -> logits -> float64 log-probs -> preference_loss."""

import pytest
import torch

import spa_kernels as sk
from tests.helpers import oracle_token_logprobs, seq_reduce


def setup(B=3, T=6, H=12, V=57, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 4:] = -100  # padding
    return hidden, weight, ref_hidden, ref_weight, labels


def oracle_logps(hidden, weight, labels, average=False):
    logits = hidden.double() @ weight.double().t()
    return seq_reduce(oracle_token_logprobs(logits, labels), labels, average=average)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "dlma", "simpo", "spa"])
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_matches_composition(loss_type, impl):
    if impl not in sk.available_impls():
        pytest.skip(f"{impl} unavailable")
    hidden, weight, ref_hidden, ref_weight, labels = setup()
    B = hidden.shape[0] // 2
    kw, okw = {}, {}
    if loss_type == "dlma":
        kw["margin"] = okw["margin"] = torch.tensor([0.5, -1.0, 2.0])
    if loss_type == "spa":
        kw["noisy"] = okw["noisy"] = torch.tensor([True, False, False])
    average = loss_type in ("ipo", "simpo")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss_fn = sk.FusedLinearPreferenceLoss(beta=0.2, loss_type=loss_type, impl=impl,
                                           label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    out = loss_fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)
    out.loss.backward()

    ho, wo = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = oracle_logps(ho, wo, labels, average)
    ref = oracle_logps(ref_hidden, ref_weight, labels, average)
    o = sk.preference_loss(lp[:B], lp[B:], None if loss_type == "simpo" else ref[:B],
                           None if loss_type == "simpo" else ref[B:], beta=0.2, loss_type=loss_type,
                           label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0, **okw)
    o.loss.backward()
    torch.testing.assert_close(out.loss.double(), o.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), ho.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wo.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps.double(), lp[:B].detach(), rtol=1e-5, atol=1e-5)
    assert out.metrics()["rewards/accuracies"] == pytest.approx(o.metrics()["rewards/accuracies"])


def test_precomputed_ref_logps_equal_ref_hidden_path():
    hidden, weight, ref_hidden, ref_weight, labels = setup()
    loss_fn = sk.FusedLinearPreferenceLoss(beta=0.1)
    a = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    ref = sk.linear_sequence_logprobs(ref_hidden, ref_weight, labels)
    b = loss_fn(hidden, weight, labels, ref_logps=ref)
    c = loss_fn(hidden, weight, labels, ref_logps=ref.chunk(2))
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, c.loss)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_spa_with_extrapolated_noise_detection(impl):
    if impl not in sk.available_impls():
        pytest.skip(f"{impl} unavailable")
    hidden, weight, ref_hidden, ref_weight, labels = setup(B=4)
    B, beta, lam = 4, 0.1, 0.5
    # the threshold: halfway between two sorted oracle margins, so some pairs are noisy and some not
    z = hidden.double() @ weight.double().t()
    zr = ref_hidden.double() @ ref_weight.double().t()
    ext = seq_reduce(oracle_token_logprobs((1 + lam) * z - lam * zr, labels), labels)
    ref = seq_reduce(oracle_token_logprobs(zr, labels), labels)
    margins = beta * ((ext[:B] - ref[:B]) - (ext[B:] - ref[B:]))
    m = margins.sort().values
    threshold = ((m[1] + m[2]) / 2).item()
    loss_fn = sk.FusedLinearPreferenceLoss(beta=beta, loss_type="spa", lam=lam, noise_threshold=threshold,
                                           impl=impl)
    h = hidden.clone().requires_grad_()
    out = loss_fn(h, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    out.loss.backward()
    torch.testing.assert_close(out.extrapolated_margins.double(), margins, rtol=1e-5, atol=1e-5)
    assert out.noisy.tolist() == (margins <= threshold).tolist()
    assert 0 < int(out.noisy.sum()) < B
    lp = seq_reduce(oracle_token_logprobs(z, labels), labels)
    o = sk.preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=beta, loss_type="spa", noisy=margins <= threshold)
    torch.testing.assert_close(out.loss.double(), o.loss, rtol=1e-5, atol=1e-6)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_errors():
    hidden, weight, ref_hidden, ref_weight, labels = setup()
    with pytest.raises(ValueError, match="needs the reference"):
        sk.FusedLinearPreferenceLoss()(hidden, weight, labels)
    with pytest.raises(ValueError, match="lam .* needs loss_type='spa'"):
        sk.FusedLinearPreferenceLoss(lam=0.5)
    with pytest.raises(ValueError, match="needs `noisy` or `noise_threshold`"):
        sk.FusedLinearPreferenceLoss(loss_type="spa", lam=0.5)(hidden, weight, labels, ref_hidden=ref_hidden,
                                                               ref_weight=ref_weight)
    with pytest.raises(ValueError, match="an even count"):
        sk.FusedLinearPreferenceLoss()(hidden[:5], weight, labels[:5], ref_logps=torch.zeros(5))
    with pytest.raises(ValueError, match=r"ref_logps must be \[6\]"):
        sk.FusedLinearPreferenceLoss()(hidden, weight, labels, ref_logps=torch.zeros(4))
