"""spa_sequence_logprobs (policy, reference and extrapolated log-probs in one pass) against a float64 oracle."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device, impl_params
from tests.helpers import (
    assert_no_worse,
    eager_token_logprobs,
    make_labels,
    make_logits,
    oracle_token_logprobs,
    seq_reduce,
)

IMPLS = impl_params("spa_logprobs")
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def oracle_extrapolated(logits, ref_logits, lam):
    z, zr = logits.double(), ref_logits.double()
    return torch.where(z == float("-inf"), z, (1 + lam) * z - lam * zr)


def _run(impl, logits, ref_logits, labels, lam, ignore_index=-100, average=False):
    reason = _dispatch.unusable_reason("spa_logprobs", impl, {"logits": logits, "ref_logits": ref_logits,
                                                              "labels": labels})
    if reason:
        pytest.skip(reason)
    T = logits.shape[1]
    x = logits.detach().clone().requires_grad_()
    xr = ref_logits.detach().clone().requires_grad_()
    logps, ref, ext = sk.spa_sequence_logprobs(x, xr, labels, lam=lam, ignore_index=ignore_index, average=average,
                                               impl=impl)
    assert not ref.requires_grad and not ext.requires_grad
    up = torch.randn_like(logps)
    (logps * up + ref + ext).sum().backward()
    assert xr.grad is None, "ref_logits must never receive a gradient"

    red = lambda t: seq_reduce(t, labels, ignore_index, average)
    xo = logits.detach().double().requires_grad_()
    o_logps = red(oracle_token_logprobs(xo, labels, ignore_index))
    (o_logps * up.double()).sum().backward()
    o_ref = red(oracle_token_logprobs(ref_logits, labels, ignore_index))
    o_ext = red(oracle_token_logprobs(oracle_extrapolated(logits, ref_logits, lam), labels, ignore_index))
    xe = logits.detach().clone().requires_grad_()
    e_logps = red(eager_token_logprobs(xe, labels, ignore_index).float())
    (e_logps * up.float()).sum().backward()
    e_ref = red(eager_token_logprobs(ref_logits, labels, ignore_index).float())
    ext_in = ((1 + lam) * logits.float() - lam * ref_logits.float()).to(logits.dtype)
    e_ext = red(eager_token_logprobs(ext_in, labels, ignore_index).float())

    tol = dict(atol=1e-5 * max(T, 1), rtol=1e-5)
    assert_no_worse(logps, o_logps, e_logps, name=f"{impl} logps", **tol)
    assert_no_worse(ref, o_ref, e_ref, name=f"{impl} ref_logps", **tol)
    assert_no_worse(ext, o_ext, e_ext, name=f"{impl} extrapolated", **tol)
    assert_no_worse(x.grad, xo.grad, xe.grad, atol=1e-6, rtol=GRAD_RTOL[logits.dtype], name=f"{impl} grad")
    return logps, ref, ext


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 123), (1, 1, 9), (3, 3, 2100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lam", [0.5, 0.125])
def test_spa_triple_matches_oracle(impl, dtype, shape, lam):
    dev = impl_device(impl)
    logits = make_logits(shape, dtype, dev)
    ref_logits = (logits.float() + make_logits(shape, torch.float32, dev, scale=0.5)).to(dtype)
    labels = make_labels(shape[:2], shape[2], dev)
    _run(impl, logits, ref_logits, labels, lam)


@pytest.mark.parametrize("impl", IMPLS)
def test_lam_zero_gives_policy_logps_and_average(impl):
    dev = impl_device(impl)
    logits = make_logits((3, 6, 200), torch.float32, dev)
    ref_logits = make_logits((3, 6, 200), torch.float32, dev)
    labels = make_labels((3, 6), 200, dev, ignore_index=7, ignore_frac=0.3)
    labels[2] = 7
    logps, _, ext = _run(impl, logits, ref_logits, labels, 0.0, ignore_index=7, average=True)
    assert_no_worse(ext, logps, atol=1e-6, name="lam=0")
    assert logps[2].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_vocabulary_minus_inf_in_both(impl):
    dev = impl_device(impl)
    logits = make_logits((2, 4, 300), torch.float32, "cpu")
    ref_logits = make_logits((2, 4, 300), torch.float32, "cpu")
    logits[..., 250:] = float("-inf")  # padded vocabulary entries masked in both models
    ref_logits[..., 250:] = float("-inf")
    labels = make_labels((2, 4), 250, "cpu")
    logps, ref, ext = _run(impl, logits.to(dev), ref_logits.to(dev), labels.to(dev), 0.25)
    assert torch.isfinite(ext).all() and torch.isfinite(logps).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_and_non_contiguous(impl):
    dev = impl_device(impl)
    big = make_logits((2, 7, 140), torch.float32, dev, scale=1e4)
    big_ref = make_logits((7, 2, 140), torch.float32, dev, scale=1e4)
    logits = big[:, 1:, :131]
    ref_logits = big_ref.transpose(0, 1)[:, :6, :131]
    labels = make_labels((2, 6), 131, dev)
    _run(impl, logits, ref_logits, labels, 0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label(impl):
    dev = impl_device(impl)
    logits = make_logits((2, 3, 50), torch.float32, dev)
    labels = make_labels((2, 3), 50, dev, ignore_frac=0.0)
    labels[0, 1] = 50
    reason = _dispatch.unusable_reason("spa_logprobs", impl, {"logits": logits, "ref_logits": logits,
                                                              "labels": labels})
    if reason:
        pytest.skip(reason)
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 50 is outside \[0, 50\)"):
        sk.spa_sequence_logprobs(logits, logits.clone(), labels, lam=0.5, impl=impl)


def test_shape_and_value_errors():
    logits = torch.randn(2, 3, 10)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ref_logits must have logits' shape"):
        sk.spa_sequence_logprobs(logits, torch.randn(2, 3, 11), labels, lam=0.5)
    with pytest.raises(ValueError, match="lam must be finite"):
        sk.spa_sequence_logprobs(logits, logits, labels, lam=float("nan"))


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_gradcheck_float64(impl):
    if _dispatch.impl_unavailable_reason(impl):
        pytest.skip(_dispatch.impl_unavailable_reason(impl))
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 11, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 10], [0, 5, 3]])
    fn = lambda x: sk.spa_sequence_logprobs(x, ref, labels, lam=0.25, impl=impl)[0]
    assert torch.autograd.gradcheck(fn, (logits,))
