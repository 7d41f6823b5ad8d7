"""token_logprobs / sequence_logprobs on every implementation usable here, against a float64 oracle."""

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

IMPLS = impl_params("logprobs")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (N, T, V): V misses every block size; T=1; V above the CPU kernel's 1024-element online-LSE block.
SHAPES = [(2, 5, 123), (1, 1, 7), (3, 4, 1031), (2, 3, 2500)]


def _skip_unusable(impl, tensors):
    reason = _dispatch.unusable_reason("logprobs", impl, tensors)
    if reason:
        pytest.skip(reason)


def _check(impl, logits, labels, *, ignore_index=-100, average=False, temperature=1.0, inplace=False):
    """Forward and backward of sequence_logprobs against the oracle, with a random upstream gradient."""
    dtype = logits.dtype
    T = logits.shape[1]
    x = logits.detach().clone().requires_grad_()
    # in place: the logits must be a non-leaf (as a model's output is); its buffer receives the gradient
    out = sk.sequence_logprobs(x * 1.0 if inplace else x, labels, ignore_index=ignore_index, average=average,
                               temperature=temperature, impl=impl, inplace_backward=inplace)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (logits.shape[0],)
    upstream = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    (out * upstream).sum().backward()

    xo = logits.detach().double().requires_grad_()
    oracle = seq_reduce(oracle_token_logprobs(xo, labels, ignore_index, temperature), labels, ignore_index, average)
    (oracle * upstream.double()).sum().backward()
    xe = logits.detach().clone().requires_grad_()
    eager = seq_reduce(eager_token_logprobs(xe, labels, ignore_index, temperature).float(), labels, ignore_index,
                       average)
    (eager * upstream.float()).sum().backward()

    assert_no_worse(out, oracle, eager, atol=1e-5 * max(T, 1), rtol=1e-5, name=f"{impl} {dtype} logps")
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert_no_worse(x.grad, xo.grad, xe.grad, atol=1e-6, rtol=GRAD_RTOL[dtype], name=f"{impl} {dtype} grad")
    return out, x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sequence_logprobs_matches_oracle(impl, dtype, shape):
    dev = impl_device(impl)
    logits = make_logits(shape, dtype, dev)
    labels = make_labels(shape[:2], shape[2], dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    _check(impl, logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_average_and_temperature(impl, dtype):
    dev = impl_device(impl)
    logits = make_logits((3, 6, 257), dtype, dev)
    labels = make_labels((3, 6), 257, dev, ignore_frac=0.4)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    _check(impl, logits, labels, average=True, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [3, -1, 0])
def test_ignore_index_inside_vocab(impl, ignore_index):
    dev = impl_device(impl)
    logits = make_logits((2, 7, 50), torch.float32, dev)
    labels = make_labels((2, 7), 50, dev, ignore_index=ignore_index, ignore_frac=0.3)
    labels[0, 0] = ignore_index
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    _check(impl, logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_huge_logits(impl, dtype):
    dev = impl_device(impl)
    logits = make_logits((2, 4, 300), dtype, dev, scale=1e4 if dtype != torch.float16 else 5e3)
    labels = make_labels((2, 4), 300, dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    out, x = _check(impl, logits, labels)
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_entries(impl, dtype):
    dev = impl_device(impl)
    N, T, V = 2, 5, 1500
    logits = make_logits((N, T, V), dtype, "cpu")
    logits[torch.rand(N, T, V) < 0.2] = float("-inf")
    logits[0, 1, :1100] = float("-inf")  # a whole online-LSE block of -inf, then finite values
    labels = make_labels((N, T), V, "cpu")
    finite = torch.isfinite(logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    labels = labels.masked_fill(~finite, -100)  # a label on -inf gets -inf; tested separately below
    logits, labels = logits.to(dev), labels.to(dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    out, x = _check(impl, logits, labels)
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_label_on_minus_inf_gives_minus_inf(impl):
    dev = impl_device(impl)
    logits = make_logits((1, 2, 40), torch.float32, dev)
    labels = torch.tensor([[5, 6]], device=dev)
    logits[0, 0, 5] = float("-inf")
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    tok = sk.token_logprobs(logits, labels, impl=impl)
    assert tok[0, 0].item() == float("-inf") and torch.isfinite(tok[0, 1])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_empty(impl):
    dev = impl_device(impl)
    logits = make_logits((3, 4, 33), torch.float32, dev)
    labels = make_labels((3, 4), 33, dev)
    labels[1] = -100
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    out, x = _check(impl, logits, labels, average=True)
    assert out[1].item() == 0.0 and bool((x.grad[1] == 0).all())
    # every token ignored
    labels_none = torch.full((3, 4), -100, device=dev)
    out, x = _check(impl, logits, labels_none)
    assert bool((out == 0).all()) and bool((x.grad == 0).all())
    # empty batch
    empty = make_logits((0, 4, 33), torch.float32, dev).requires_grad_()
    res = sk.sequence_logprobs(empty, torch.zeros(0, 4, dtype=torch.long, device=dev), impl=impl)
    assert res.shape == (0,)
    res.sum().backward()
    assert empty.grad.shape == (0, 4, 33)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    dev = impl_device(impl)
    big = make_logits((3, 9, 130), torch.float32, dev)
    labels_big = make_labels((3, 18), 129, dev)
    cases = {
        "time_slice": (big[:, 1:, :129], labels_big[:, ::2][:, :8]),  # the usual logits[:, :-1] shift, any stride
        "transposed": (big.transpose(0, 1)[:, :, :129], labels_big[:, :9].t().contiguous()[:, :3]),
        "vocab_stride": (big[:, :, ::2][:, :, :50], labels_big[:, :9].clamp(max=49)),
    }
    for name, (logits, labels) in cases.items():
        assert not logits.is_contiguous(), name
        _skip_unusable(impl, {"logits": logits, "labels": labels})
        _check(impl, logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_2d_and_3d(impl):
    dev = impl_device(impl)
    logits = make_logits((4, 6, 77), torch.float32, dev)
    labels = make_labels((4, 6), 77, dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    tok = sk.token_logprobs(logits, labels, impl=impl)
    assert tok.shape == (4, 6)
    assert_no_worse(tok, oracle_token_logprobs(logits, labels), atol=1e-5, name="token")
    flat = sk.token_logprobs(logits.reshape(24, 77), labels.reshape(24), impl=impl)
    assert flat.shape == (24,)
    assert_no_worse(flat, tok.reshape(24), atol=1e-6, name="2d vs 3d")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [123, 1000, -5])
def test_out_of_range_label_is_a_value_error(impl, bad):
    dev = impl_device(impl)
    logits = make_logits((2, 4, 123), torch.float32, dev)
    labels = make_labels((2, 4), 123, dev, ignore_frac=0.0)
    labels[1, 2] = bad
    labels[1, 3] = bad  # the first bad position is reported
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    with pytest.raises(ValueError, match=rf"labels\[1, 2\] = {bad} is outside \[0, 123\) and is not ignore_index"):
        sk.sequence_logprobs(logits, labels, impl=impl)


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward(impl, dtype):
    dev = impl_device(impl)
    logits = make_logits((2, 5, 311), dtype, dev)
    labels = make_labels((2, 5), 311, dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    a = logits.clone().requires_grad_()
    sk.sequence_logprobs(a, labels, impl=impl).sum().backward()
    # in-place: the gradient is written into the buffer the logits were in
    base = logits.clone().requires_grad_()
    b = base * 1.0  # a non-leaf whose buffer the backward may overwrite
    sk.sequence_logprobs(b, labels, impl=impl, inplace_backward=True).sum().backward()
    assert torch.equal(base.grad, a.grad)
    assert torch.equal(b.detach(), a.grad)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0] != "torch"])
def test_inplace_backward_makes_later_reuse_fail_loudly(impl):
    dev = impl_device(impl)
    logits = make_logits((2, 3, 40), torch.float32, dev)
    labels = make_labels((2, 3), 40, dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    base = logits.clone().requires_grad_()
    z = base * 1.0
    other = (z ** 2).sum()  # also saves z for its backward
    lp = sk.sequence_logprobs(z, labels, impl=impl, inplace_backward=True).sum()
    lp.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0] != "torch"])
def test_backward_writes_every_element_of_a_poisoned_buffer(impl):
    dev = impl_device(impl)
    logits = make_logits((2, 4, 97), torch.float32, dev)
    labels = make_labels((2, 4), 97, dev, ignore_frac=0.5)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    kernels = _dispatch._backend_module("logprobs", impl)[0]
    tok, lse = kernels.forward(logits, labels, -100, 1.0)
    g = torch.randn(2, 4, device=dev)
    poisoned = torch.full_like(logits, float("nan"))
    grad = kernels.backward(g, logits, labels, lse, -100, 1.0, grad_out=poisoned)
    assert grad.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(poisoned).all()
    xo = logits.double().requires_grad_()
    (oracle_token_logprobs(xo, labels) * g.double()).sum().backward()
    assert_no_worse(poisoned, xo.grad, atol=1e-6, name="grad_out")


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_gradcheck_float64(impl):
    if _dispatch.impl_unavailable_reason(impl):
        pytest.skip(_dispatch.impl_unavailable_reason(impl))
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 10], [0, 5, -100]])
    assert torch.autograd.gradcheck(lambda x: sk.sequence_logprobs(x, labels, impl=impl, temperature=0.9), (logits,))
    assert torch.autograd.gradcheck(lambda x: sk.sequence_logprobs(x, labels, impl=impl, average=True), (logits,))


def test_no_grad_input_gets_no_grad():
    logits = torch.randn(2, 3, 10)
    out = sk.sequence_logprobs(logits, torch.randint(0, 10, (2, 3)))
    assert not out.requires_grad


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(logits=torch.randint(0, 5, (2, 3, 5)), labels=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     "logits must be a floating-point"),
    (dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3)), TypeError, "labels must be an integer"),
    (dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     r"labels must have shape \[2, 3\]"),
    (dict(logits=torch.randn(2, 3, 0), labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     "empty vocabulary"),
    (dict(logits=torch.randn(6, 5), labels=torch.zeros(6, dtype=torch.long)), ValueError, r"must be \[N, T, V\]"),
    (dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long), temperature=0.0), ValueError,
     "temperature must be a positive"),
    (dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long), impl="fast"), ValueError,
     "impl='fast' is not one of"),
])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sk.sequence_logprobs(**kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["sequence", "spa"])
def test_inplace_backward_on_a_leaf_raises_before_compute(impl, op):
    """The leaf's data would be overwritten by its own gradient and its .grad would alias it."""
    dev = impl_device(impl)
    logits = make_logits((2, 3, 40), torch.float32, dev)
    labels = make_labels((2, 3), 40, dev)
    _skip_unusable(impl, {"logits": logits, "labels": labels})
    if op == "spa" and _dispatch.unusable_reason("spa_logprobs", impl, {"logits": logits, "ref_logits": logits}):
        pytest.skip("no spa_logprobs backend")
    for x in (logits.clone().requires_grad_(), logits.clone().requires_grad_()[:, :-1]):  # a leaf, a view of one
        before = x.detach().clone()
        with pytest.raises(ValueError, match="inplace_backward=True .* leaf tensor"):
            if op == "spa":
                sk.spa_sequence_logprobs(x, logits[:, :x.shape[1]], labels[:, :x.shape[1]], lam=0.5, impl=impl,
                                         inplace_backward=True)
            else:
                sk.sequence_logprobs(x, labels[:, :x.shape[1]], impl=impl, inplace_backward=True)
        assert torch.equal(x.detach(), before)
    # a leaf that needs no gradient has no backward to write: fine
    sk.sequence_logprobs(logits, labels, impl=impl, inplace_backward=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["sequence", "spa"])
def test_inplace_backward_on_expanded_logits_falls_back_to_a_fresh_gradient(impl, op):
    """Rows that share memory (stride 0) cannot each receive their own gradient in place: the backward writes a
    regular gradient buffer instead, and the result is the one without inplace_backward."""
    dev = impl_device(impl)
    V = 37
    row = make_logits((1, 1, V), torch.float32, dev)
    labels = make_labels((3, 4), V, dev, ignore_frac=0.0)
    if _dispatch.unusable_reason("logprobs" if op == "sequence" else "spa_logprobs", impl,
                                 {"logits": row, "ref_logits": row, "labels": labels}):
        pytest.skip("backend unusable here")
    ref_logits = make_logits((3, 4, V), torch.float32, dev)
    grads = []
    for inplace in (False, True):
        leaf = row.clone().requires_grad_()
        y = (leaf * 1.0).expand(3, 4, V)  # a non-leaf whose 12 rows are one row in memory
        if op == "spa":
            out = sk.spa_sequence_logprobs(y, ref_logits, labels, lam=0.5, impl=impl, inplace_backward=inplace)[0]
        else:
            out = sk.sequence_logprobs(y, labels, impl=impl, inplace_backward=inplace)
        (out * torch.arange(1.0, 4.0, device=dev)).sum().backward()
        grads.append(leaf.grad)
    xo = row.double().requires_grad_()
    oracle = seq_reduce(oracle_token_logprobs(xo.expand(3, 4, V), labels), labels)
    (oracle * torch.arange(1.0, 4.0, device=dev, dtype=torch.float64)).sum().backward()
    assert torch.equal(grads[0], grads[1])
    assert_no_worse(grads[1], xo.grad, atol=1e-5, rtol=1e-5, name=f"{impl} expanded grad")


def test_may_overlap():
    from spa_kernels._validation import may_overlap

    x = torch.zeros(2, 3, 5)
    assert not may_overlap(x) and not may_overlap(x[:, :-1]) and not may_overlap(x.transpose(0, 1))
    assert not may_overlap(x[:, :1].expand(2, 1, 5)) and not may_overlap(torch.zeros(1, 1, 5).expand(1, 1, 5))
    assert may_overlap(x[:, :1].expand(2, 4, 5)) and may_overlap(torch.zeros(5).expand(2, 3, 5))
    assert may_overlap(torch.zeros(20).as_strided((2, 3, 5), (5, 2, 1)))  # rows 2 apart, 5 long: interleaved
