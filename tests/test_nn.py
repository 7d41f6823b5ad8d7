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


def fused_oracle(hidden, weight, bias, labels, ref_logps, temperature=1.0, softcap=None, average=False, beta=0.2,
                 loss_type="sigmoid", reduction="mean"):
    """The loss and its input gradients through float64 logits -> (softcapped) log-softmax -> preference_loss."""
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b = None if bias is None else bias.double().requires_grad_()
    z = h @ w.t() + (0 if b is None else b)
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = seq_reduce(oracle_token_logprobs(z, labels), labels, average=average)
    B = hidden.shape[0] // 2
    out = sk.preference_loss(lp[:B], lp[B:], ref_logps[:B].double(), ref_logps[B:].double(), beta=beta,
                             loss_type=loss_type, reduction=reduction)
    out.loss.backward()
    return out.loss, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 10_000])
@pytest.mark.parametrize("case", ["plain", "bias+temperature+softcap+average", "sum+grad_scale"])
def test_fused_pair_loss_independent_of_chunk_size(chunk_size, case, impl):
    """A scalar loss computes the gradient inside the forward, pairs batched into chunks (a pair longer than a
    chunk in sub-chunks), over the backend's log-prob kernels: the result must not depend on how the tokens are
    chunked. (impl="triton" runs its kernels under the interpreter here; it has no softcap kernel.)"""
    if impl not in sk.available_impls():
        pytest.skip(f"{impl} unavailable")
    if impl == "triton" and ("softcap" in case or chunk_size in (1, 3)):
        pytest.skip("triton: no softcap log-prob kernel; tiny chunks are slow under the interpreter")
    hidden, weight, _, _, labels = setup(B=4, T=9, H=12, V=57, seed=1)
    labels[6] = -100  # the rejected of pair 2 has no scored token
    labels[3, 5:] = -100  # chosen sequences of different lengths
    g = torch.Generator().manual_seed(5)
    ref_logps = -20 * torch.rand(8, generator=g)
    bias = 0.3 * torch.randn(weight.shape[0], generator=g) if case.startswith("bias") else None
    kw = dict(temperature=0.7, softcap=2.5, average=True, loss_type="ipo") if case.startswith("bias") else {}
    reduction = "sum" if case.startswith("sum") else "mean"
    grad_scale = 3.0 if case.startswith("sum") else 1.0
    loss_fn = sk.FusedLinearPreferenceLoss(beta=0.2, impl=impl, chunk_size=chunk_size, reduction=reduction,
                                           temperature=kw.get("temperature", 1.0), softcap=kw.get("softcap"),
                                           loss_type=kw.get("loss_type", "sigmoid"))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    w.grad = torch.ones_like(w)  # an existing .grad is accumulated into, as autograd does
    out = loss_fn(h, w, labels, b, ref_logps=ref_logps)
    assert type(out.loss.grad_fn).__name__.startswith("FusedLinearPairLossFunction")
    (grad_scale * out.loss).backward()

    loss, gh, gw, gb = fused_oracle(hidden, weight, bias, labels, ref_logps, reduction=reduction, beta=0.2, **kw)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), grad_scale * gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 1 + grad_scale * gw, rtol=1e-4, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(b.grad.double(), grad_scale * gb, rtol=1e-4, atol=1e-6)
    assert out.losses.shape == (4,) and out.chosen_logps.shape == (4,)


def test_fused_pair_loss_only_where_it_applies():
    """No gradient needed, reduction="none", or a reference that itself needs a gradient: the log-probs path."""
    hidden, weight, ref_hidden, ref_weight, labels = setup()
    h = hidden.clone().requires_grad_()
    ref = sk.linear_sequence_logprobs(ref_hidden, ref_weight, labels)
    name = lambda out: type(out.loss.grad_fn).__name__
    assert name(sk.FusedLinearPreferenceLoss(impl="cpu")(h, weight, labels, ref_logps=ref)).startswith("Fused")
    assert sk.FusedLinearPreferenceLoss(impl="cpu")(hidden, weight, labels, ref_logps=ref).loss.grad_fn is None
    out = sk.FusedLinearPreferenceLoss(impl="cpu", reduction="none")(h, weight, labels, ref_logps=ref)
    assert out.loss.shape == (3,) and not name(out).startswith("Fused")
    out = sk.FusedLinearPreferenceLoss(impl="cpu")(h, weight, labels, ref_logps=ref.clone().requires_grad_())
    assert not name(out).startswith("Fused")
    with pytest.raises(RuntimeError, match="handed over already"):
        out = sk.FusedLinearPreferenceLoss(impl="cpu")(h, weight, labels, ref_logps=ref)
        out.loss.backward(retain_graph=True)
        out.loss.backward()
