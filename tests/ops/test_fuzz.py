"""Property-based fuzzing of every op on every implementation usable in this process against a float64 oracle.

Random shapes (V not a multiple of any block, T = 1, V above the CPU kernel's 1024-element block), layouts (slices
such as logits[:, :-1], rows that start off a 16-byte boundary, a transposed batch), dtypes (float32; bfloat16
under the "no worse than eager bf16" rule of tests/helpers.assert_no_worse), ignore patterns (all ignored,
ignore_index inside the vocabulary), temperature, average, in-place backward, and non-finite values (NaN, -inf,
+inf, in lane 0 of a vector as well as elsewhere). The expected semantics are torch.log_softmax + gather on the
scored positions: NaN exactly where it gives NaN (a row holding a NaN or a +inf logit is NaN, forward and
gradient); ignored positions give 0 and a zero gradient whatever their logits hold. Forward and gradient.

Bounded in time: each test has a fixed example budget and no deadline; the Triton interpreter gets fewer examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device, impl_params
from tests.helpers import assert_no_worse, eager_token_logprobs, oracle_token_logprobs, seq_reduce

NAN, INF = float("nan"), float("inf")
EXAMPLES = {"torch": 50, "cpu": 100, "triton": 30, "cuda": 100}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
LAYOUTS = ("contiguous", "time_slice", "vocab_slice", "transposed")


def _settings(impl):
    return settings(max_examples=EXAMPLES[impl], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- inputs --------------------------------------------------------------------------------------------------------
@st.composite
def shapes(draw):
    n = draw(st.integers(1, 3))
    t = draw(st.integers(1, 4))
    v = draw(st.one_of(st.integers(1, 80), st.sampled_from([127, 129, 257, 1000, 1025, 1031])))
    return n, t, v


def draw_case(draw):
    """What every fuzz case draws first: a seeded generator for its tensors, the dtype and the [N, T, V] shape."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    return gen, dtype, draw(shapes(), label="shape")


def layout_view(base: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """The [N, T, V] view of `base` (built by make_base) for a layout."""
    N, T, V = shape
    if layout == "time_slice":
        return base[:, :-1]
    if layout == "vocab_slice":
        return base[..., 3:V + 3]
    if layout == "transposed":
        return base.transpose(0, 1)
    return base


def base_shape(layout: str, shape):
    N, T, V = shape
    return {"time_slice": (N, T + 1, V), "vocab_slice": (N, T, V + 5), "transposed": (T, N, V)}.get(layout, shape)


def inject(x: torch.Tensor, draw, name: str) -> None:
    """Writes a few NaN / -inf / +inf values into x [N, T, V] (in place), sometimes at lane 0 of a vector."""
    V = x.shape[-1]
    for _ in range(draw(st.integers(0, 3), label=f"{name} non-finite count")):
        value = draw(st.sampled_from([NAN, -INF, INF, -INF]), label=f"{name} value")
        n = draw(st.integers(0, x.shape[0] - 1))
        t = draw(st.integers(0, x.shape[1] - 1))
        v = draw(st.one_of(st.integers(0, V - 1), st.sampled_from([0, (8 * 2) % V, (V - 1)])))
        if draw(st.booleans(), label=f"{name} whole row -inf") and value == -INF:
            x[n, t] = -INF
        else:
            x[n, t, v] = value


def make_labels(draw, gen, N, T, V, ignore_index):
    pattern = draw(st.sampled_from(["random", "none ignored", "all ignored"]))
    labels = torch.randint(0, V, (N, T), generator=gen)
    if pattern == "all ignored":
        return torch.full((N, T), ignore_index)
    if pattern == "random":
        labels[torch.rand(N, T, generator=gen) < 0.3] = ignore_index
    return labels


def draw_logits(draw, gen, shape, dtype, name="logits"):
    """(leaf float tensor in the layout's base shape, [N, T, V] view maker): values drawn from a seed."""
    layout = draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
    scale = draw(st.sampled_from([1.0, 3.0, 30.0]), label=f"{name} scale")
    base = (torch.randn(base_shape(layout, shape), generator=gen) * scale).to(dtype)
    inject(layout_view(base, layout, shape), draw, name)
    return base, lambda t: layout_view(t, layout, shape)


def skip_unusable(op, impl, tensors):
    reason = _dispatch.unusable_reason(op, impl, tensors)
    if reason:
        pytest.skip(reason)


# ---- oracles --------------------------------------------------------------------------------------------------------
def scored_only(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Ignored rows replaced by zeros: their content must not matter (forward 0, gradient 0)."""
    return torch.where((labels != ignore_index).unsqueeze(-1), x, torch.zeros((), dtype=x.dtype))


def oracle_tokens(z, labels, ignore_index, temperature=1.0):
    return oracle_token_logprobs(scored_only(z, labels, ignore_index), labels, ignore_index, temperature)


def eager_tokens(z, labels, ignore_index, temperature=1.0):
    return eager_token_logprobs(scored_only(z, labels, ignore_index), labels, ignore_index, temperature).float()


def check_grad(got, want, eager, dtype, name):
    assert got is not None, f"{name}: no gradient"
    assert_no_worse(got, want, eager, atol=1e-6, rtol=GRAD_RTOL[dtype], name=name)


def forward_atol(T, average):
    return 1e-5 * (1 if average else max(T, 1))


# ---- tests ----------------------------------------------------------------------------------------------------------
LOGPROB_IMPLS = impl_params("logprobs")


def _token_or_sequence(impl, data, op):
    draw = data.draw
    gen, dtype, (N, T, V) = draw_case(draw)
    ignore_index = draw(st.sampled_from([-100, -1, 3]), label="ignore_index")
    temperature = draw(st.sampled_from([1.0, 1.0, 0.7, 2.5]), label="temperature")
    average = op == "sequence" and draw(st.booleans(), label="average")
    inplace = impl != "torch" and draw(st.booleans(), label="inplace_backward")
    dev = impl_device(impl)
    base, view = draw_logits(draw, gen, (N, T, V), dtype)
    labels = make_labels(draw, gen, N, T, V, ignore_index)
    skip_unusable("logprobs", impl, {"logits": view(base).to(dev), "labels": labels.to(dev)})

    leaf = base.to(dev, copy=True).requires_grad_()
    src = leaf * 1.0 if inplace else leaf  # the in-place backward needs a non-leaf (a model's output)
    x = view(src)
    kw = dict(ignore_index=ignore_index, temperature=temperature, impl=impl, inplace_backward=inplace)
    out = sk.sequence_logprobs(x, labels.to(dev), average=average, **kw) if op == "sequence" else \
        sk.token_logprobs(x, labels.to(dev), **kw)
    g = torch.randn(out.shape, generator=gen)
    (out * g.to(out)).sum().backward()

    xo = base.detach().double().requires_grad_()
    o = oracle_tokens(view(xo), labels, ignore_index, temperature)
    xe = base.detach().clone().requires_grad_()
    e = eager_tokens(view(xe), labels, ignore_index, temperature)
    if op == "sequence":
        o, e = seq_reduce(o, labels, ignore_index, average), seq_reduce(e, labels, ignore_index, average)
    (o * g.double()).sum().backward()
    (e * g).sum().backward()
    assert_no_worse(out, o, e, atol=forward_atol(T, average), rtol=1e-5, name=f"{impl} {op} {dtype}")
    check_grad(leaf.grad, xo.grad, xe.grad, dtype, f"{impl} {op} {dtype} grad")


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("op", ["token", "sequence"])
def test_fuzz_token_and_sequence_logprobs(impl, op):
    @_settings(impl)
    @given(data=st.data())
    def run(data):
        _token_or_sequence(impl, data, op)

    run()


@pytest.mark.parametrize("impl", impl_params("spa_logprobs"))
def test_fuzz_spa_sequence_logprobs(impl):
    @_settings(impl)
    @given(data=st.data())
    def run(data):
        draw = data.draw
        gen, dtype, (N, T, V) = draw_case(draw)
        ignore_index = draw(st.sampled_from([-100, 0]), label="ignore_index")
        lam = draw(st.sampled_from([0.0, 0.5, 2.0]), label="lam")
        average = draw(st.booleans(), label="average")
        inplace = impl != "torch" and draw(st.booleans(), label="inplace_backward")
        dev = impl_device(impl)
        base, view = draw_logits(draw, gen, (N, T, V), dtype)
        ref_base, ref_view = draw_logits(draw, gen, (N, T, V), dtype, name="ref_logits")
        labels = make_labels(draw, gen, N, T, V, ignore_index)
        skip_unusable("spa_logprobs", impl, {"logits": view(base).to(dev), "ref_logits": ref_view(ref_base).to(dev),
                                             "labels": labels.to(dev)})
        leaf = base.to(dev, copy=True).requires_grad_()
        x = view(leaf * 1.0 if inplace else leaf)
        outs = sk.spa_sequence_logprobs(x, ref_view(ref_base.to(dev)), labels.to(dev), lam=lam,
                                        ignore_index=ignore_index, average=average, impl=impl,
                                        inplace_backward=inplace)
        g = torch.randn(N, generator=gen)
        (outs[0] * g.to(outs[0])).sum().backward()

        xo = base.detach().double().requires_grad_()
        z, zr = view(xo), ref_view(ref_base.double())
        ext = torch.where(z == -INF, z, (1 + lam) * z - lam * zr)
        oracles = [seq_reduce(oracle_tokens(t, labels, ignore_index), labels, ignore_index, average)
                   for t in (z, zr, ext)]
        (oracles[0] * g.double()).sum().backward()
        xe = base.detach().clone().requires_grad_()
        ze, zre = view(xe), ref_view(ref_base)
        ext_e = torch.where(ze == -INF, ze.float(), (1 + lam) * ze.float() - lam * zre.float())
        eagers = [seq_reduce(eager_tokens(t, labels, ignore_index), labels, ignore_index, average)
                  for t in (ze, zre, ext_e)]
        (eagers[0] * g).sum().backward()
        for got, want, eager, name in zip(outs, oracles, eagers, ("logps", "ref_logps", "extrapolated")):
            assert_no_worse(got, want, eager, atol=forward_atol(T, average) * (1 + 2 * lam), rtol=1e-5,
                            name=f"{impl} spa {name} {dtype}")
        check_grad(leaf.grad, xo.grad, xe.grad, dtype, f"{impl} spa {dtype} grad")

    run()


def _linear_inputs(draw, gen, dtype, N, T, V):
    H = draw(st.sampled_from([1, 8, 31]), label="H")
    layout = draw(st.sampled_from(["contiguous", "transposed", "time_slice"]), label="hidden layout")
    hb = torch.randn(base_shape(layout, (N, T, H)), generator=gen).to(dtype)
    scale = draw(st.sampled_from([1.0, 4.0]), label="weight scale")
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5 * scale).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype) if draw(st.booleans(), label="bias") else None
    kind = draw(st.sampled_from(["none", "none", "nan weight row", "nan hidden", "-inf bias", "+inf bias"]),
                label="non-finite")
    v = draw(st.sampled_from([0, 8 % V, 16 % V, V - 1]), label="bad column")
    if kind == "nan weight row":
        weight[v] = NAN
    elif kind == "nan hidden":
        layout_view(hb, layout, (N, T, H))[draw(st.integers(0, N - 1)), draw(st.integers(0, T - 1)), 0] = NAN
    elif kind.endswith("bias"):
        bias = torch.zeros(V).to(dtype) if bias is None else bias
        bias[v] = -INF if kind == "-inf bias" else INF
    return hb, (lambda t: layout_view(t, layout, (N, T, H))), weight, bias


def linear_tolerances(dtype, z, T, average, H):
    """(forward atol, gradient atol, gradient rtol) of the linear ops. bfloat16 logits are rounded (by the matmul)
    before the log-softmax, differently by each implementation: up to half an ulp of the largest logit per token."""
    finite = z.detach()[torch.isfinite(z.detach())]
    zmax = float(finite.abs().max()) if finite.numel() else 0.0
    tokens = 1 if average else max(T, 1)
    if dtype == torch.bfloat16:
        return tokens * 2**-7 * (1 + zmax), 2e-2 * z.shape[0] * z.shape[1], 2e-2
    return tokens * 1e-5 * (1 + H / 8) * (1 + zmax / 8), 1e-5 * z.shape[0] * z.shape[1], 1e-4


def _linear_oracle(h, w, b, labels, ignore_index, temperature=1.0):
    # ignored tokens never reach the matmul: their hidden states must not matter (nor meet a NaN weight row)
    z = torch.nn.functional.linear(scored_only(h, labels, ignore_index), w, b)
    return oracle_tokens(z, labels, ignore_index, temperature)


def _linear_eager(h, w, b, labels, ignore_index, temperature=1.0):
    z = torch.nn.functional.linear(scored_only(h, labels, ignore_index), w, b)
    return eager_tokens(z, labels, ignore_index, temperature)


@pytest.mark.parametrize("impl", impl_params("linear_logprobs"))
def test_fuzz_linear_sequence_logprobs(impl):
    @_settings(impl)
    @given(data=st.data())
    def run(data):
        draw = data.draw
        gen, dtype, (N, T, V) = draw_case(draw)
        ignore_index = draw(st.sampled_from([-100, 2]), label="ignore_index")
        temperature = draw(st.sampled_from([1.0, 0.7]), label="temperature")
        average = draw(st.booleans(), label="average")
        chunk_size = draw(st.sampled_from([None, 1, 3]), label="chunk_size")
        hb, hview, weight, bias = _linear_inputs(draw, gen, dtype, N, T, V)
        labels = make_labels(draw, gen, N, T, V, ignore_index)
        dev = impl_device(impl)
        skip_unusable("linear_logprobs", impl, {"hidden": hview(hb).to(dev), "weight": weight.to(dev),
                                                "bias": None if bias is None else bias.to(dev),
                                                "labels": labels.to(dev)})
        leaves = [t.to(dev, copy=True).requires_grad_() if t is not None else None for t in (hb, weight, bias)]
        out = sk.linear_sequence_logprobs(hview(leaves[0]), leaves[1], labels.to(dev), bias=leaves[2],
                                          ignore_index=ignore_index, temperature=temperature, average=average,
                                          impl=impl, chunk_size=chunk_size)
        g = torch.randn(N, generator=gen)
        (out * g.to(out)).sum().backward()
        olv = [t.double().requires_grad_() if t is not None else None for t in (hb, weight, bias)]
        o = seq_reduce(_linear_oracle(hview(olv[0]), olv[1], olv[2], labels, ignore_index, temperature), labels,
                       ignore_index, average)
        (o * g.double()).sum().backward()
        elv = [t.clone().requires_grad_() if t is not None else None for t in (hb, weight, bias)]
        e = seq_reduce(_linear_eager(hview(elv[0]), elv[1], elv[2], labels, ignore_index, temperature), labels,
                       ignore_index, average)
        (e * g).sum().backward()
        z = torch.nn.functional.linear(hview(hb).double(), weight.double(), None if bias is None else bias.double())
        atol, grad_atol, grad_rtol = linear_tolerances(dtype, z, T, average, weight.shape[1])
        assert_no_worse(out, o, e, atol=atol, rtol=1e-5, name=f"{impl} linear {dtype}")
        for got, want, eager, name in zip(leaves, olv, elv, ("hidden", "weight", "bias")):
            if got is not None:
                assert_no_worse(got.grad, want.grad, eager.grad, atol=grad_atol, rtol=grad_rtol,
                                name=f"{impl} linear {dtype} grad {name}")

    run()


@pytest.mark.parametrize("impl", impl_params("linear_spa_logprobs"))
def test_fuzz_linear_spa_sequence_logprobs(impl):
    @_settings(impl)
    @given(data=st.data())
    def run(data):
        draw = data.draw
        gen, dtype, (N, T, V) = draw_case(draw)
        ignore_index = -100
        lam = draw(st.sampled_from([0.0, 0.5]), label="lam")
        hb, hview, weight, bias = _linear_inputs(draw, gen, dtype, N, T, V)
        rhb, rhview, rweight, rbias = _linear_inputs(draw, gen, dtype, N, T, V)
        labels = make_labels(draw, gen, N, T, V, ignore_index)
        dev = impl_device(impl)
        d = lambda t: None if t is None else t.to(dev)  # noqa: E731
        tensors = {"hidden": hview(hb).to(dev), "weight": d(weight), "bias": d(bias), "ref_hidden": d(rhview(rhb)),
                   "ref_weight": d(rweight), "ref_bias": d(rbias), "labels": d(labels)}
        skip_unusable("linear_spa_logprobs", impl, tensors)
        h = hb.to(dev, copy=True).requires_grad_()
        outs = sk.linear_spa_sequence_logprobs(hview(h), d(weight), d(rhview(rhb)), d(rweight), d(labels), lam=lam,
                                               bias=d(bias), ref_bias=d(rbias), impl=impl)
        g = torch.randn(N, generator=gen)
        (outs[0] * g.to(outs[0])).sum().backward()

        def logits(hh, w, b):
            return torch.nn.functional.linear(hh, w, b)

        ho = hb.detach().double().requires_grad_()
        dd = lambda t: None if t is None else t.double()  # noqa: E731
        sc = lambda t: scored_only(t, labels, ignore_index)  # noqa: E731
        z, zr = logits(sc(hview(ho)), dd(weight), dd(bias)), logits(sc(rhview(rhb.double())), dd(rweight), dd(rbias))
        ext = torch.where(z == -INF, z, (1 + lam) * z - lam * zr)
        oracles = [seq_reduce(oracle_tokens(t, labels, ignore_index), labels) for t in (z, zr, ext)]
        (oracles[0] * g.double()).sum().backward()
        he = hb.detach().clone().requires_grad_()
        ze, zre = logits(sc(hview(he)), weight, bias), logits(sc(rhview(rhb)), rweight, rbias)
        ext_e = torch.where(ze == -INF, ze.float(), (1 + lam) * ze.float() - lam * zre.float())
        eagers = [seq_reduce(eager_tokens(t, labels, ignore_index), labels) for t in (ze, zre, ext_e)]
        (eagers[0] * g).sum().backward()
        H = max(weight.shape[1], rweight.shape[1])
        atol, grad_atol, grad_rtol = linear_tolerances(dtype, torch.cat([z, zr], -1), T, False, H)
        for got, want, eager, name in zip(outs, oracles, eagers, ("logps", "ref_logps", "extrapolated")):
            assert_no_worse(got, want, eager, atol=atol * (1 + 2 * lam), rtol=1e-5,
                            name=f"{impl} linear spa {name} {dtype}")
        assert_no_worse(h.grad, ho.grad, he.grad, atol=grad_atol, rtol=grad_rtol,
                        name=f"{impl} linear spa {dtype} grad hidden")

    run()
