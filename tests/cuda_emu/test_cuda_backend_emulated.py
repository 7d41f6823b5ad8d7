"""The impl="cuda" Python glue (spa_kernels/ops/*/cuda.py: custom ops, in-place backward, label flags; the chunked
linear path over them) driven end to end on the CPU, with the extension's CUDA entry points replaced by the emulated
kernels (tests/cuda_emu/harness.cpp mirrors the real launchers). On a GPU the same paths run natively in tests/ops/."""

import platform

import pytest
import torch

from spa_kernels import _dispatch, _ext
from spa_kernels._validation import label_check
from spa_kernels.ops.linear_logprobs.function import LinearTokenLogprobsFunction
from spa_kernels.ops.linear_spa_logprobs.function import LinearSpaTokenLogprobsFunction
from spa_kernels.ops.logprobs.function import TokenLogprobsFunction
from spa_kernels.ops.spa_logprobs import reference as spa_reference
from spa_kernels.ops.spa_logprobs.function import SpaTokenLogprobsFunction
from tests.cuda_emu import build
from tests.helpers import assert_no_worse, make_labels, make_logits, oracle_token_logprobs

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="the emulator uses ucontext (Linux)"),
    pytest.mark.skipif(build.cuda_include() is None, reason="no CUDA headers (set CUDA_HOME)"),
]
AUTO = (-1, 0)  # the real launchers' launch shape


def CUDA(op):  # noqa: N802 - reads as the backend it names
    """The impl="cuda" backend of `op`, as the dispatcher hands it to the op's autograd.Function."""
    return _dispatch.backend(op, "cuda")


class EmulatedKernels:
    """The CUDA entry points of spa_kernels._C, on CPU tensors."""

    def __init__(self, emu):
        self.emu = emu
        self.calls = []

    def logprobs_forward_cuda(self, logits, labels, ignore_index, inv_temperature, softcap=0.0):
        self.calls.append("forward")
        return self.emu.logprobs_forward(logits, labels, ignore_index, inv_temperature, *AUTO, softcap)

    def logprobs_backward_cuda(self, grad_token, logits, labels, lse, ignore_index, inv_temperature, grad_out=None,
                               softcap=0.0):
        self.calls.append("backward" if grad_out is None else "backward_into")
        grad = torch.empty(logits.shape, dtype=logits.dtype) if grad_out is None else grad_out
        self.emu.logprobs_backward(grad_token, logits, labels, lse, ignore_index, inv_temperature, grad, *AUTO,
                                   softcap)
        return grad

    def spa_logprobs_forward_cuda(self, logits, ref_logits, labels, ignore_index, lam):
        self.calls.append("spa_forward")
        return self.emu.spa_logprobs_forward(logits, ref_logits, labels, ignore_index, lam, *AUTO)


@pytest.fixture(scope="module")
def emu():
    return build.load()


@pytest.fixture
def kernels(emu, monkeypatch):
    fake = EmulatedKernels(emu)
    monkeypatch.setattr(_ext, "kernels", lambda: fake)
    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_token_logprobs_forward_backward(kernels, dtype, inplace):
    logits = make_logits((2, 5, 1031), dtype)
    labels = make_labels((2, 5), 1031)
    x = logits.clone().requires_grad_()
    y = x * 1.0  # a non-leaf: the in-place backward may overwrite its buffer
    tok = TokenLogprobsFunction.apply(y, labels, -100, 1 / 0.8, inplace, CUDA("logprobs"))
    g = torch.randn(2, 5)
    (tok * g).sum().backward()
    xo = logits.double().requires_grad_()
    oracle = oracle_token_logprobs(xo, labels, -100, 0.8)
    (oracle * g.double()).sum().backward()
    assert_no_worse(tok, oracle, atol=2e-5, rtol=1e-5, name="token")
    assert_no_worse(x.grad, xo.grad, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 8e-3, name="grad")
    assert kernels.calls == ["forward", "backward_into" if inplace else "backward"]
    if inplace:
        assert torch.equal(y.detach(), x.grad)  # the gradient was written into the logits buffer


def test_bad_label_raises_in_the_call_unless_trusted(kernels):
    logits = make_logits((2, 4, 123), torch.float32)
    labels = make_labels((2, 4), 123, ignore_frac=0.0)
    labels[1, 2] = 123
    labels[1, 3] = -3
    with pytest.raises(ValueError, match=r"^labels\[1, 2\] = 123 is outside \[0, 123\) and is not ignore_index "
                                         r"\(-100\)$"):
        TokenLogprobsFunction.apply(logits, labels, -100, 1.0, False, CUDA("logprobs"))  # "sync": validate=True
    with label_check("trusted"):
        tok = TokenLogprobsFunction.apply(logits, labels, -100, 1.0, False, CUDA("logprobs"))
    assert bool((tok[1, 2:] == 0).all())  # scored as ignored, never read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_spa_triple_and_its_backward(kernels, dtype):
    logits = make_logits((2, 3, 700), dtype)
    ref_logits = make_logits((2, 3, 700), dtype)
    labels = make_labels((2, 3), 700)
    x = logits.clone().requires_grad_()
    tok, ref, ext = SpaTokenLogprobsFunction.apply(x, ref_logits, labels, -100, 0.5, False, CUDA("spa_logprobs"))
    tok.sum().backward()
    xo = logits.double().requires_grad_()
    want = spa_reference.spa_token_logprobs(xo, ref_logits.double(), labels, 0.5)
    want[0].sum().backward()
    for got, w, name in zip((tok, ref, ext), want, ("logps", "ref", "extrapolated")):
        assert_no_worse(got, w, atol=3e-5, rtol=1e-5, name=name)
    assert_no_worse(x.grad, xo.grad, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 1e-3, name="grad")
    assert kernels.calls == ["spa_forward", "backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_linear_path_over_the_cuda_kernels(kernels, dtype):
    M, H, V, chunk = 37, 24, 301, 8  # chunks of 8 tokens, the last one partial
    hidden = torch.randn(M, H).to(dtype)
    weight = (torch.randn(V, H) / H ** 0.5 * 2).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    labels = torch.randint(0, V, (M,))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    tok = LinearTokenLogprobsFunction.apply(*leaves, labels, 1.0, chunk, None, CUDA("linear_logprobs"))
    g = torch.randn(M)
    (tok * g).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*ref_leaves)
    want = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    (want * g.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_no_worse(tok, want, atol=tol, rtol=tol, name="token")
    for got, w, name in zip(leaves, ref_leaves, ("hidden", "weight", "bias")):
        assert_no_worse(got.grad, w.grad, atol=tol, rtol=tol, name=f"grad_{name}")
    n_chunks = -(-M // chunk)
    assert kernels.calls == ["forward"] * n_chunks + ["backward_into"] * n_chunks  # gradient into the chunk buffer


def test_chunked_linear_spa_path_over_the_cuda_kernels(kernels):
    M, H, V = 21, 16, 257
    hidden, ref_hidden = torch.randn(M, H), torch.randn(M, H)
    weight, ref_weight = torch.randn(V, H) / 4, torch.randn(V, H) / 4
    labels = torch.randint(0, V, (M,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tok, ref, ext = LinearSpaTokenLogprobsFunction.apply(h, w, None, ref_hidden, ref_weight, None, labels, 0.5, 6,
                                                         CUDA("linear_spa_logprobs"))
    tok.sum().backward()
    z, zr = hidden.double() @ weight.double().T, ref_hidden.double() @ ref_weight.double().T
    want = spa_reference.spa_token_logprobs(z[None], zr[None], labels[None], 0.5)
    for got, wt, name in zip((tok, ref, ext), want, ("logps", "ref", "extrapolated")):
        assert_no_worse(got, wt[0], atol=2e-5, rtol=1e-5, name=name)
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    assert kernels.calls.count("spa_forward") == 4 and kernels.calls.count("backward_into") == 4
