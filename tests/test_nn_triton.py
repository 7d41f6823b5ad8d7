"""FusedLinearPreferenceLoss end to end on the Triton kernels (impl="triton"; the interpreter on the CPU), against the
same module on the pure-PyTorch reference (itself checked against a float64 composition in test_nn.py), and the
choice of Triton by impl="auto" for CUDA tensors."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device
from tests.test_nn import setup

pytestmark = pytest.mark.skipif(_dispatch.impl_unavailable_reason("triton") is not None,
                                reason=str(_dispatch.impl_unavailable_reason("triton")))
LINEAR_OPS = ("linear_logprobs", "linear_spa_logprobs")


def _run(impl, loss_type, tensors, bias=None, **kw):
    hidden, weight, ref_hidden, ref_weight, labels = tensors
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    loss_fn = sk.FusedLinearPreferenceLoss(beta=0.2, loss_type=loss_type, impl=impl, chunk_size=5,
                                           label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
                                           **{k: kw.pop(k) for k in ("lam", "noise_threshold") if k in kw})
    out = loss_fn(h, w, labels, b, ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("loss_type", sk.LOSS_TYPES)
def test_every_loss_type_matches_the_reference(loss_type):
    dev = impl_device("triton")
    tensors = [t.to(dev) for t in setup(B=3, T=7, H=20, V=75)]
    bias = torch.randn(75, device=dev) * 0.3
    kw = {}
    if loss_type == "dlma":
        kw["margin"] = torch.tensor([0.5, -1.0, 2.0], device=dev)
    if loss_type == "spa":
        kw["noisy"] = torch.tensor([True, False, True], device=dev)
    got = _run("triton", loss_type, tensors, bias, **kw)
    want = _run("torch", loss_type, tensors, bias, **kw)
    torch.testing.assert_close(got[0].loss, want[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].chosen_logps, want[0].chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].rejected_rewards, want[0].rejected_rewards, rtol=1e-5, atol=1e-6)
    for name, a, e in zip(("hidden", "weight", "bias"), got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"grad {name}: {m}")


def test_spa_extrapolated_margin_from_the_same_pass():
    dev = impl_device("triton")
    tensors = [t.to(dev) for t in setup(B=4, T=6, H=16, V=90)]
    probe = _run("torch", "spa", tensors, lam=0.5, noise_threshold=0.0)[0].extrapolated_margins.sort().values
    threshold = float((probe[1] + probe[2]) / 2)  # some pairs noisy, some not
    got = _run("triton", "spa", tensors, lam=0.5, noise_threshold=threshold)
    want = _run("torch", "spa", tensors, lam=0.5, noise_threshold=threshold)
    torch.testing.assert_close(got[0].extrapolated_margins, want[0].extrapolated_margins, rtol=1e-5, atol=1e-6)
    assert got[0].noisy.tolist() == want[0].noisy.tolist() and 0 < int(got[0].noisy.sum()) < 4
    torch.testing.assert_close(got[0].loss, want[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", LINEAR_OPS + ("logprobs", "spa_logprobs"))
def test_auto_order_puts_triton_first_on_cuda(op):
    assert _dispatch.auto_order(op, torch.device("cuda"))[0] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["sigmoid", "spa"])
def test_gpu_auto_runs_triton_end_to_end_bf16(loss_type, monkeypatch):
    monkeypatch.delenv("SPA_KERNELS_IMPL", raising=False)
    B, T, H, V = 2, 256, 1024, 32000
    tensors = [t.to("cuda") for t in setup(B=B, T=T, H=H, V=V, dtype=torch.bfloat16)]
    hidden, weight, ref_hidden, ref_weight, labels = tensors
    probe = {"hidden": hidden, "weight": weight, "bias": None, "labels": labels}
    assert _dispatch.resolve("linear_logprobs", "auto", probe)[0] == "triton"
    probe.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=None)
    assert _dispatch.resolve("linear_spa_logprobs", "auto", probe)[0] == "triton"
    kw = {"lam": 0.5, "noise_threshold": 0.0} if loss_type == "spa" else {}
    got = _run("auto", loss_type, tensors, **kw)
    want = _run("torch", loss_type, tensors, **kw)
    torch.testing.assert_close(got[0].chosen_logps, want[0].chosen_logps, rtol=2e-3, atol=0.05 * T ** 0.5)
    torch.testing.assert_close(got[0].loss, want[0].loss, rtol=2e-2, atol=2e-2)
    for a, e in zip(got[1:3], want[1:3]):
        assert torch.isfinite(a).all()
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), e.float().flatten(), dim=0)
        assert cos > 0.999, f"gradient direction differs from the reference (cosine {cos.item():.5f})"
