"""softcap= on the impl="cuda" chunked linear path, with the CUDA kernels' device code run on the CPU by the
emulator: the cap is applied to each chunk's logits before the (emulated) forward kernel, and the backward kernel's
in-place gradient is multiplied by the cap's derivative."""

import pytest
import torch

from spa_kernels import _dispatch
from spa_kernels.ops.linear_logprobs.function import LinearTokenLogprobsFunction
from tests.cuda_emu.test_cuda_backend_emulated import emu, kernels, pytestmark  # noqa: F401 (fixtures, marks)
from tests.ops.test_softcap import _inputs, oracle


@pytest.mark.parametrize("temperature,softcap", [(1.0, 5.0), (0.5, 1.5)])
def test_cuda_chunked_linear_softcap(kernels, temperature, softcap):  # noqa: F811
    (hidden, weight, bias), labels = _inputs(torch.float32)
    keep = labels.reshape(-1) != -100
    h, lab = hidden.reshape(-1, hidden.shape[-1])[keep], labels.reshape(-1)[keep]
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    tok = LinearTokenLogprobsFunction.apply(*leaves, lab, 1.0 / temperature, 4, softcap,
                                            _dispatch.backend("linear_logprobs", "cuda"))
    ref = [t.double().requires_grad_() for t in (h, weight, bias)]
    want = oracle(ref[0].unsqueeze(1), ref[1], ref[2], lab.unsqueeze(1), temperature, softcap)
    up = torch.randn(tok.shape[0], dtype=torch.float64)
    (tok.double() * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(tok.double(), want.detach(), rtol=2e-5, atol=2e-5)
    for got, r in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), r.grad, rtol=1e-4, atol=2e-5)
    assert kernels.calls[0] == "forward" and "backward_into" in kernels.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("launch", [(1, 0), (0, 128)], ids=["warp", "block128"])
def test_logprobs_kernels_softcap(emu, dtype, launch):  # noqa: F811
    """The CUDA device code itself (emulated): forward log-probs and the backward gradient of capped logits, with a
    row layout that has a misaligned head, aligned packs and a tail, against float64 autograd."""
    g = torch.Generator().manual_seed(3)
    V, cap, inv_t = 1031, 2.5, 1 / 0.7
    logits = (torch.randn(2, 5, V, generator=g) * 8).to(dtype)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 3] = -100
    tok, lse, _ = emu.logprobs_forward(logits, labels, -100, inv_t, *launch, cap)
    up = torch.randn(2, 5, generator=g)
    grad = torch.empty_like(logits)
    emu.logprobs_backward(up, logits, labels, lse, -100, inv_t, grad, *launch, cap)
    x = logits.double().requires_grad_()
    c = cap * torch.tanh(x * inv_t / cap)
    lp = torch.log_softmax(c, -1)
    mask = labels != -100
    want = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (want * up.double()).sum().backward()
    torch.testing.assert_close(tok.double(), want.detach(), rtol=1e-5, atol=2e-5)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.double(), x.grad, rtol=rtol, atol=2e-6 if dtype == torch.float32 else 2e-4)
    plain, _, _ = emu.logprobs_forward(logits, labels, -100, inv_t, *launch)  # cap 0: no capping
    assert (plain - tok).abs().max() > 1e-2
