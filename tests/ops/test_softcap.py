"""softcap= (final-logit softcapping, Gemma 2 / 3): log_softmax(cap * tanh((h W^T + b) / (T cap))) in every backend,
forward and backward, against a float64 autograd oracle."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_params

IMPLS = impl_params("linear_logprobs")


def oracle(hidden, weight, bias, labels, temperature, softcap):
    z = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z, -1)
    mask = labels != -100
    tok = lp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    return tok.sum(-1)


def _inputs(dtype, bias=True, scale=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, T, H, V = 3, 7, 24, 70
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64) * scale  # logits well beyond the cap
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    return [t if t is None else t.to(dtype) for t in (hidden, weight, b)], labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature,softcap,bias", [(1.0, 5.0, True), (0.25, 30.0, False), (2.0, 0.7, True)])
def test_softcap_forward_backward(impl, dtype, temperature, softcap, bias):
    (hidden, weight, b), labels = _inputs(dtype, bias)
    reason = _dispatch.unusable_reason("linear_logprobs", impl,
                                       {"hidden": hidden, "weight": weight, "bias": b, "labels": labels})
    if reason:
        pytest.skip(reason)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = sk.linear_sequence_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature,
                                      softcap=softcap, impl=impl, chunk_size=5)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want = oracle(*ref_leaves, labels, temperature, softcap)
    up = torch.linspace(-1.0, 2.0, out.shape[0], dtype=torch.float64)
    (out.double() * up).sum().backward()
    (want * up).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    for got, ref in zip(leaves, ref_leaves):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), ref.grad, **tol)
    # the cap changes the answer: without it the log-probs are different (the test would notice a dropped cap)
    plain = oracle(*[None if t is None else t.detach() for t in ref_leaves], labels, temperature, None)
    assert (plain - want.detach()).abs().max() > 1e-2


def test_softcap_gradcheck_torch_and_cpu():
    (hidden, weight, b), labels = _inputs(torch.float64, scale=1.5)
    for impl in [i for i in ("torch", "cpu") if i in _dispatch.IMPLS and not _dispatch.unusable_reason(
            "linear_logprobs", i, {"hidden": hidden, "weight": weight, "bias": b, "labels": labels})]:
        fn = lambda h, w, bb, impl=impl: sk.linear_sequence_logprobs(h, w, labels, bias=bb, softcap=2.0,
                                                                     temperature=0.5, impl=impl)
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (hidden, weight, b)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_softcap_must_be_positive_finite(bad):
    (hidden, weight, b), labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        sk.linear_sequence_logprobs(hidden, weight, labels, softcap=bad, impl="torch")
