"""softcap= on the impl="cuda" chunked linear path, with the CUDA kernels' device code run on the CPU by the
emulator: the cap is applied to each chunk's logits before the (emulated) forward kernel, and the backward kernel's
in-place gradient is multiplied by the cap's derivative."""

import pytest
import torch

from spa_kernels.ops.linear_logprobs import function as linear_fn
from tests.cuda_emu.test_cuda_backend_emulated import emu, kernels, pytestmark  # noqa: F401 (fixtures, marks)
from tests.ops.test_softcap import _inputs, oracle


@pytest.mark.parametrize("temperature,softcap", [(1.0, 5.0), (0.5, 1.5)])
def test_cuda_chunked_linear_softcap(kernels, temperature, softcap):  # noqa: F811
    (hidden, weight, bias), labels = _inputs(torch.float32)
    keep = labels.reshape(-1) != -100
    h, lab = hidden.reshape(-1, hidden.shape[-1])[keep], labels.reshape(-1)[keep]
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    tok = linear_fn.ChunkedLinearLogprobsFunction.apply(*leaves, lab, 1.0 / temperature, 4, "cuda", softcap)
    ref = [t.double().requires_grad_() for t in (h, weight, bias)]
    want = oracle(ref[0].unsqueeze(1), ref[1], ref[2], lab.unsqueeze(1), temperature, softcap)
    up = torch.randn(tok.shape[0], dtype=torch.float64)
    (tok.double() * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(tok.double(), want.detach(), rtol=2e-5, atol=2e-5)
    for got, r in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), r.grad, rtol=1e-4, atol=2e-5)
    assert kernels.calls[0] == "forward" and "backward_into" in kernels.calls
