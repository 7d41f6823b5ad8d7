"""NaN and +inf logits on every implementation: the semantics of torch.log_softmax + gather (a row holding a NaN or
a +inf logit gives NaN for every label of the row and a NaN gradient row; other rows are unaffected), the numerics
of large logits at a temperature, and the temperatures every backend rejects."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device, impl_params
from tests.helpers import assert_no_worse, eager_token_logprobs, make_labels, make_logits, oracle_token_logprobs

NAN, INF = float("nan"), float("inf")
LOGPROB_IMPLS = impl_params("logprobs")
SPA_IMPLS = impl_params("spa_logprobs")
LINEAR_IMPLS = impl_params("linear_logprobs")
LINEAR_SPA_IMPLS = impl_params("linear_spa_logprobs")


def _skip_unusable(op, impl, tensors):
    reason = _dispatch.unusable_reason(op, impl, tensors)
    if reason:
        pytest.skip(reason)


def _oracle_with_grad(logits, labels, g, temperature=1.0):
    xo = logits.detach().double().requires_grad_()
    tok = oracle_token_logprobs(xo, labels, temperature=temperature)
    (tok * g.double()).sum().backward()
    return tok, xo.grad


def _run_token(impl, logits, labels, g, temperature=1.0):
    x = logits.detach().clone().requires_grad_()
    tok = sk.token_logprobs(x, labels, impl=impl, temperature=temperature)
    (tok * g.to(tok.dtype)).sum().backward()
    return tok, x.grad


# (V, position of the bad value): lane 0 of a vector, another lane, a later 1024-element block, the scalar tail
NAN_CASES = [(2048, 0), (1000, 16), (1000, 3), (2048, 1500), (1031, 1030), (7, 2)]


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
@pytest.mark.parametrize("V, pos", NAN_CASES, ids=[f"V{v}-at{p}" for v, p in NAN_CASES])
def test_nan_or_plus_inf_logit_gives_a_nan_row(impl, dtype, bad, V, pos):
    dev = impl_device(impl)
    logits = make_logits((2, 3, V), dtype, dev)
    labels = make_labels((2, 3), V, dev, ignore_frac=0.0)
    labels[0, 1] = (pos + 1) % V  # the label is not the bad entry
    labels[1, 2] = pos  # ... or it is
    logits[0, 1, pos] = bad
    logits[1, 2, pos] = bad
    _skip_unusable("logprobs", impl, {"logits": logits, "labels": labels})
    g = torch.randn(2, 3, device=dev)
    tok, grad = _run_token(impl, logits, labels, g)
    o_tok, o_grad = _oracle_with_grad(logits, labels, g)
    for n, t in [(0, 1), (1, 2)]:
        assert torch.isnan(o_tok[n, t]) and torch.isnan(o_grad[n, t]).all()  # what torch.log_softmax does
        assert torch.isnan(tok[n, t]), f"{impl}: row ({n}, {t}) gives {tok[n, t].item()} instead of NaN"
        assert torch.isnan(grad[n, t]).all(), f"{impl}: row ({n}, {t}) gradient is not all NaN"
    ok = torch.ones(2, 3, dtype=torch.bool, device=dev)
    ok[0, 1] = ok[1, 2] = False
    assert torch.isfinite(tok[ok]).all() and torch.isfinite(grad[ok]).all()
    assert_no_worse(tok[ok], o_tok[ok], atol=1e-4, rtol=1e-4, name=f"{impl} other rows")


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_nan_sequence_logprobs_example(impl):
    dev = impl_device(impl)
    x = torch.randn(1, 1, 2048, device=dev)
    x[0, 0, 0] = NAN
    labels = torch.tensor([[5]], device=dev)
    _skip_unusable("logprobs", impl, {"logits": x, "labels": labels})
    assert torch.isnan(sk.sequence_logprobs(x, labels, impl=impl)).all()
    assert torch.isnan(sk.sequence_logprobs(x, labels, impl=impl, average=True, temperature=0.5)).all()


@pytest.mark.parametrize("impl", SPA_IMPLS)
@pytest.mark.parametrize("where", ["policy", "reference"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
def test_spa_triple_non_finite(impl, where, bad):
    """One token per sequence (T = 1), so the per-sequence values are the token values."""
    dev = impl_device(impl)
    V = 1000
    logits = make_logits((3, 1, V), torch.float32, dev)
    ref_logits = make_logits((3, 1, V), torch.float32, dev)
    labels = make_labels((3, 1), V, dev, ignore_frac=0.0)
    labels[0, 0] = 3
    (logits if where == "policy" else ref_logits)[0, 0, 16] = bad
    _skip_unusable("spa_logprobs", impl, {"logits": logits, "ref_logits": ref_logits, "labels": labels})
    x = logits.clone().requires_grad_()
    logps, ref, ext = sk.spa_sequence_logprobs(x, ref_logits, labels, lam=0.5, impl=impl)
    logps.sum().backward()
    bad_policy = where == "policy"
    assert torch.isnan(logps[0]).item() == bad_policy
    assert torch.isnan(ref[0]).item() == (not bad_policy)
    # the extrapolated logit (1 + lam) z - lam z_ref of the bad entry is NaN or -inf (ref +inf): NaN unless -inf
    assert torch.isnan(ext[0]).item() == (bad_policy or bad != bad)
    assert torch.isfinite(logps[1:]).all() and torch.isfinite(ref[1:]).all() and torch.isfinite(ext[1:]).all()
    assert torch.isnan(x.grad[0]).all().item() == bad_policy
    assert torch.isfinite(x.grad[1:]).all()


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_nan_weight_row(impl):
    dev = impl_device(impl)
    N, T, H, V = 2, 3, 16, 100
    hidden = torch.randn(N, T, H, device=dev)
    weight = torch.randn(V, H, device=dev) * 0.3
    weight[16] = NAN  # every token's logit 16 is NaN (lane 0 of a CPU vector: the case the horizontal max dropped)
    labels = make_labels((N, T), V, dev, ignore_frac=0.0)
    labels[1, 2] = -100
    _skip_unusable("linear_logprobs", impl, {"hidden": hidden, "weight": weight, "labels": labels})
    h = hidden.clone().requires_grad_()
    out = sk.linear_sequence_logprobs(h, weight, labels, impl=impl)
    assert torch.isnan(out).all(), f"{impl}: {out}"
    out.sum().backward()
    assert torch.isnan(h.grad[labels != -100]).all()


@pytest.mark.parametrize("impl", LINEAR_SPA_IMPLS)
def test_linear_spa_nan_weight_row(impl):
    dev = impl_device(impl)
    N, T, H, V = 2, 2, 16, 100
    hidden, ref_hidden = torch.randn(N, T, H, device=dev), torch.randn(N, T, H, device=dev)
    weight, ref_weight = torch.randn(V, H, device=dev) * 0.3, torch.randn(V, H, device=dev) * 0.3
    ref_weight[40] = NAN
    labels = make_labels((N, T), V, dev, ignore_frac=0.0)
    _skip_unusable("linear_spa_logprobs", impl, {"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden,
                                                 "ref_weight": ref_weight, "labels": labels})
    logps, ref, ext = sk.linear_spa_sequence_logprobs(hidden, weight, ref_hidden, ref_weight, labels, lam=0.5,
                                                      impl=impl)
    assert torch.isfinite(logps).all() and torch.isnan(ref).all() and torch.isnan(ext).all()


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_huge_logits_at_a_temperature(impl, temperature):
    """|logit / T| ~ 5e4: the scaled logit's rounding must be the same in forward and backward (the gradient is then
    as precise as eager float32's)."""
    dev = impl_device(impl)
    for scale, V in [(1e4, 300), (3e4, 33)]:
        logits = make_logits((2, 3, V), torch.float32, dev, scale=scale)
        labels = make_labels((2, 3), V, dev, ignore_frac=0.0)
        _skip_unusable("logprobs", impl, {"logits": logits, "labels": labels})
        g = torch.randn(2, 3, device=dev)
        tok, grad = _run_token(impl, logits, labels, g, temperature)
        o_tok, o_grad = _oracle_with_grad(logits, labels, g, temperature)
        xe = logits.clone().requires_grad_()
        eager = eager_token_logprobs(xe, labels, temperature=temperature)
        (eager * g).sum().backward()
        assert_no_worse(tok, o_tok, eager, atol=1e-5, rtol=1e-6, name=f"{impl} token")
        assert_no_worse(grad, o_grad, xe.grad, atol=1e-6, rtol=1e-5, name=f"{impl} grad")


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_tiny_temperature_matches_torch(impl):
    dev = impl_device(impl)
    logits = torch.randn(1, 2, 10, device=dev)
    labels = torch.tensor([[1, 2]], device=dev)
    _skip_unusable("logprobs", impl, {"logits": logits, "labels": labels})
    got = sk.token_logprobs(logits, labels, temperature=1e-30, impl=impl)
    want = eager_token_logprobs(logits, labels, temperature=1e-30)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, INF, NAN, 1e-39, 1e-45, 1e38, 1e300])
def test_unusable_temperature_is_a_value_error(impl, temperature):
    """Rejected before any backend is chosen, so on every implementation (even one that cannot run here)."""
    logits = torch.randn(1, 2, 10)
    labels = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="temperature"):
        sk.sequence_logprobs(logits, labels, temperature=temperature, impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        sk.linear_sequence_logprobs(torch.randn(1, 2, 4), torch.randn(10, 4), labels, temperature=temperature,
                                    impl=impl)
