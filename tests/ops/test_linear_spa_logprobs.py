"""linear_spa_sequence_logprobs (SPA triple from policy and reference hidden states) against a float64 oracle."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device, impl_params
from tests.helpers import assert_no_worse, eager_token_logprobs, make_labels, oracle_token_logprobs, seq_reduce
from tests.ops.test_spa_logprobs import oracle_extrapolated

IMPLS = impl_params("linear_spa_logprobs")
# Per-token log-prob tolerance: bf16/fp16 logits from a reduced-precision matmul are rounded (eager too).
LOGP_ATOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2}


def _run(impl, dtype, N, T, H, V, lam, bias, chunk_size=None, ignore_frac=0.25, average=False):
    dev = impl_device(impl)
    mk = lambda *s, scale=1.0: (torch.randn(*s) * scale).to(dtype=dtype, device=dev)
    hidden, ref_hidden = mk(N, T, H), mk(N, T, H)
    weight, ref_weight = mk(V, H, scale=2 / H ** 0.5), mk(V, H, scale=2 / H ** 0.5)
    b = mk(V, scale=0.5) if bias else None
    rb = mk(V, scale=0.5) if bias else None
    labels = make_labels((N, T), V, dev, ignore_frac=ignore_frac)
    tensors = dict(hidden=hidden, weight=weight, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=rb,
                   labels=labels)
    reason = _dispatch.unusable_reason("linear_spa_logprobs", impl, tensors)
    if reason:
        pytest.skip(reason)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    rh = ref_hidden.clone().requires_grad_()
    logps, ref, ext = sk.linear_spa_sequence_logprobs(leaves[0], leaves[1], rh, ref_weight, labels, lam=lam,
                                                      bias=leaves[2], ref_bias=rb, impl=impl, chunk_size=chunk_size,
                                                      average=average)
    up = torch.randn_like(logps)
    (logps * up + ref + ext).sum().backward()
    assert rh.grad is None

    lin = lambda h, w, bb, dt: torch.nn.functional.linear(h.to(dt), w.to(dt), None if bb is None else bb.to(dt))
    red = lambda t: seq_reduce(t, labels, average=average)
    ol = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    z = lin(*ol, torch.float64)
    zr = lin(ref_hidden, ref_weight, rb, torch.float64)
    o_logps = red(oracle_token_logprobs(z, labels))
    (o_logps * up.double()).sum().backward()
    o_ref = red(oracle_token_logprobs(zr, labels))
    o_ext = red(oracle_token_logprobs(oracle_extrapolated(z.detach(), zr, lam), labels))
    el = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ze = lin(*el, dtype)
    zre = lin(ref_hidden, ref_weight, rb, dtype)
    e_logps = red(eager_token_logprobs(ze, labels).to(up.dtype))
    (e_logps * up).sum().backward()
    e_ref = red(eager_token_logprobs(zre, labels).to(up.dtype))
    e_ext = red(eager_token_logprobs(((1 + lam) * ze.detach().float() - lam * zre.float()).to(dtype),
                                     labels).to(up.dtype))
    tol = dict(atol=LOGP_ATOL[dtype] * T, rtol=1e-5)
    assert_no_worse(logps, o_logps, e_logps, name="logps", **tol)
    assert_no_worse(ref, o_ref, e_ref, name="ref_logps", **tol)
    assert_no_worse(ext, o_ext, e_ext, name="extrapolated", **tol)
    for name, a, o, e in zip(("hidden", "weight", "bias"), leaves, ol, el):
        if a is not None:
            assert_no_worse(a.grad, o.grad, e.grad, atol=1e-5, rtol=GRAD_RTOL[dtype], name=f"grad {name}")
    return logps, ref, ext


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 31, 123), (1, 1, 8, 7), (2, 3, 40, 1100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_spa_matches_oracle(impl, dtype, shape):
    _run(impl, dtype, *shape, lam=0.5, bias=dtype != torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunks_average_and_all_ignored(impl):
    _run(impl, torch.float32, 3, 6, 16, 90, lam=0.25, bias=True, chunk_size=5, average=True)
    logps, ref, ext = _run(impl, torch.float32, 2, 3, 8, 30, lam=0.25, bias=False, ignore_frac=1.0)
    assert bool((logps == 0).all() and (ref == 0).all() and (ext == 0).all())


def test_errors():
    h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ref_weight has vocabulary size 21"):
        sk.linear_spa_sequence_logprobs(h, w, h, torch.randn(21, 8), y, lam=0.5)
    with pytest.raises(ValueError, match=r"ref_hidden must be \[N, T, H\]"):
        sk.linear_spa_sequence_logprobs(h, w, h[0], w, y, lam=0.5)
