"""What the shared per-op suites do not reach in the Triton kernels: several vocabulary slices (forward) and chunks
(backward) of the fused linear kernels, gradient subsets, huge logits from hidden states, every uninitialised buffer
poisoned, mixed policy / reference dtypes, the autotuning keys; and, on a GPU, the same checks at model scale in
bfloat16 (native, not the interpreter), offsets past 2^31 elements and a cross-check against the CUDA kernels."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device
from tests.helpers import assert_no_worse, make_labels, make_logits, oracle_token_logprobs, seq_reduce
from tests.ops.test_linear_logprobs import check_linear, make_linear
from tests.ops.test_linear_spa_logprobs import _run as check_linear_spa
from tests.ops.test_logprobs import _check as check_logprobs
from tests.ops.test_spa_logprobs import _run as check_spa
from tests.ops.test_spa_logprobs import oracle_extrapolated

pytestmark = pytest.mark.skipif(_dispatch.impl_unavailable_reason("triton") is not None,
                                reason=str(_dispatch.impl_unavailable_reason("triton")))
DEV = impl_device("triton")


def _linear_modules():
    from spa_kernels.ops.linear_logprobs import triton as linear_triton
    from spa_kernels.ops.linear_spa_logprobs import triton as linear_spa_triton

    return linear_triton, linear_spa_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_several_vocab_slices_and_chunks(dtype):
    linear_triton, _ = _linear_modules()
    N, T, H, V = 2, 8, 40, 700
    hidden, weight, bias = make_linear(N, T, H, V, dtype, DEV)
    labels = make_labels((N, T), V, DEV)
    M = int((labels != -100).sum())
    n_slices, _ = linear_triton._slices(M, V, hidden.device)
    chunk = linear_triton.vocab_chunk(M, V, 1)
    if DEV.type == "cpu":  # the interpreter's small tiles: make sure both split paths are really taken
        assert n_slices > 1 and chunk < V
    check_linear("triton", hidden, weight, bias, labels, chunk_size=1)
    check_linear_spa("triton", dtype, N, T, H, V, lam=0.25, bias=True, chunk_size=1)


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "weight+bias"])
def test_linear_gradient_subsets(needs):
    hidden, weight, bias = make_linear(2, 5, 24, 100, torch.float32, DEV)
    labels = make_labels((2, 5), 100, DEV)
    grads = {}
    for impl in ("torch", "triton"):
        leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
        for name in leaves:
            leaves[name].requires_grad_(name in needs)
        out = sk.linear_sequence_logprobs(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], impl=impl,
                                          chunk_size=2)
        out.sum().backward()
        grads[impl] = {k: v.grad for k, v in leaves.items()}
    for name, g in grads["triton"].items():
        if name in needs:
            torch.testing.assert_close(g, grads["torch"][name], rtol=1e-4, atol=1e-6)
        else:
            assert g is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_huge_logits(dtype):
    hidden, weight, bias = make_linear(2, 4, 32, 150, dtype, DEV)
    hidden = (hidden.float() * 2e3).to(dtype)  # logits of order 1e4: exp overflows without the running max
    labels = make_labels((2, 4), 150, DEV)
    out, leaves = check_linear("triton", hidden, weight, bias, labels)
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like floating buffer starts as NaN: a kernel that skips an element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def test_every_output_element_is_written(poisoned_allocations):
    logits = make_logits((2, 5, 123), torch.float32, DEV)
    labels = make_labels((2, 5), 123, DEV, ignore_frac=0.4)
    check_logprobs("triton", logits, labels)
    check_spa("triton", logits, make_logits((2, 5, 123), torch.float32, DEV), labels, 0.5)
    hidden, weight, bias = make_linear(3, 4, 31, 123, torch.float32, DEV)
    check_linear("triton", hidden, weight, bias, make_labels((3, 4), 123, DEV), chunk_size=1)
    check_linear_spa("triton", torch.float32, 2, 3, 31, 123, lam=0.5, bias=True, chunk_size=1)


def test_spa_policy_and_reference_of_different_dtypes():
    logits = make_logits((2, 6, 200), torch.bfloat16, DEV)
    ref_logits = make_logits((2, 6, 200), torch.float32, DEV)
    labels = make_labels((2, 6), 200, DEV)
    logps, ref, ext = sk.spa_sequence_logprobs(logits, ref_logits, labels, lam=0.5, impl="triton")
    assert_no_worse(logps, seq_reduce(oracle_token_logprobs(logits, labels), labels), atol=1e-4, name="logps")
    assert_no_worse(ref, seq_reduce(oracle_token_logprobs(ref_logits, labels), labels), atol=1e-4, name="ref")
    want = seq_reduce(oracle_token_logprobs(oracle_extrapolated(logits, ref_logits, 0.5), labels), labels)
    assert_no_worse(ext, want, atol=1e-4, name="extrapolated")


def test_linear_spa_reference_of_another_dtype_and_width():
    hidden, weight, _ = make_linear(2, 5, 24, 130, torch.bfloat16, DEV, bias=False)
    ref_hidden, ref_weight, ref_bias = make_linear(2, 5, 40, 130, torch.float32, DEV)  # another hidden size too
    labels = make_labels((2, 5), 130, DEV)
    logps, ref, ext = sk.linear_spa_sequence_logprobs(hidden, weight, ref_hidden, ref_weight, labels, lam=0.25,
                                                      ref_bias=ref_bias, impl="triton")
    z = hidden.double() @ weight.double().t()
    zr = torch.nn.functional.linear(ref_hidden.double(), ref_weight.double(), ref_bias.double())
    red = lambda t: seq_reduce(t, labels)
    assert_no_worse(logps, red(oracle_token_logprobs(z, labels)), atol=1e-4 * 5, name="logps")
    assert_no_worse(ref, red(oracle_token_logprobs(zr, labels)), atol=1e-4 * 5, name="ref")
    assert_no_worse(ext, red(oracle_token_logprobs(oracle_extrapolated(z, zr, 0.25), labels)), atol=1e-4 * 5,
                    name="extrapolated")


def test_autotuning_keys_never_include_the_token_count():
    from spa_kernels import _triton
    from spa_kernels.ops.logprobs import triton as logprobs_triton
    from spa_kernels.ops.spa_logprobs import triton as spa_triton

    linear_triton, linear_spa_triton = _linear_modules()
    tuned = [logprobs_triton._logprobs_fwd_kernel, spa_triton._spa_logprobs_fwd_kernel,
             linear_triton._linear_lse_fwd_kernel, linear_triton._linear_grad_logits_kernel,
             linear_spa_triton._linear_spa_fwd_kernel]
    for kernel in tuned:
        # sizes, a power-of-two bucket of the token count and alignment; never the token count itself ("M")
        assert set(kernel.keys) <= {"V", "H", "H_ref", "m_bucket", "aligned"}, kernel.keys
        assert "M" not in kernel.keys and "T" not in kernel.keys
        assert len(kernel.configs) == 1 if _triton.INTERPRET else len(kernel.configs) > 1
    assert [linear_triton.m_bucket(m) for m in (1, 2, 300, 511, 512, 4096, 10**6)] == [1, 2, 9, 9, 10, 13, 15]
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert linear_triton.aligned(x, x[:, :32]) == 1 and linear_triton.aligned(x[:, 1:]) == 0
    assert linear_triton.aligned(torch.zeros(4, 63, dtype=torch.bfloat16)) == 0


# ---------------------------------------------------------------- GPU scale: native kernels, bfloat16, big shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_logprobs_and_spa_model_vocab(dtype):
    logits = make_logits((4, 512, 32000), dtype, "cuda")
    labels = make_labels((4, 512), 32000, "cuda")
    check_logprobs("triton", logits, labels, temperature=0.9)
    check_logprobs("triton", logits, labels, inplace=True)
    ref_logits = (logits.float() + make_logits((4, 512, 32000), torch.float32, "cuda", scale=0.5)).to(dtype)
    check_spa("triton", logits[:2, :256], ref_logits[:2, :256], labels[:2, :256], 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_linear_model_shapes(dtype):
    N, T, H, V = 4, 256, 1024, 32000
    hidden, weight, _ = make_linear(N, T, H, V, dtype, "cuda", bias=False)
    labels = make_labels((N, T), V, "cuda")
    check_linear("triton", hidden, weight, None, labels)
    check_linear("triton", hidden[:2], weight, None, labels[:2], chunk_size=64)  # many vocabulary chunks
    check_linear_spa("triton", dtype, 2, 256, 1024, 32000, lam=0.5, bias=False)


@pytest.mark.gpu
def test_gpu_offsets_past_two_to_the_31_elements():
    V, rows = 128256, 16800  # rows * V > 2^31: int32 offsets would wrap
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    logits = torch.empty(1, rows, V, dtype=torch.bfloat16, device="cuda").normal_(0, 3)
    labels = torch.randint(0, V, (1, rows), device="cuda")
    x = logits.requires_grad_()
    tok = sk.token_logprobs(x, labels, impl="triton")
    tail = slice(rows - 64, rows)
    want = oracle_token_logprobs(logits.detach()[:, tail], labels[:, tail])
    assert_no_worse(tok[:, tail], want, atol=1e-4, name="last rows")
    tok.sum().backward()
    soft = torch.softmax(logits.detach()[0, tail].double(), -1)
    want_grad = torch.nn.functional.one_hot(labels[0, tail], V).double() - soft
    assert_no_worse(x.grad[0, tail], want_grad, atol=2e-3, name="last rows' gradient")


@pytest.mark.gpu
def test_gpu_triton_agrees_with_cuda():
    if _dispatch.impl_unavailable_reason("cuda"):
        pytest.skip(_dispatch.impl_unavailable_reason("cuda"))
    logits = make_logits((4, 300, 32000), torch.bfloat16, "cuda")
    labels = make_labels((4, 300), 32000, "cuda")
    outs = {}
    for impl in ("triton", "cuda"):
        x = logits.clone().requires_grad_()
        outs[impl] = (sk.sequence_logprobs(x, labels, impl=impl), x)
        outs[impl][0].sum().backward()
    torch.testing.assert_close(outs["triton"][0], outs["cuda"][0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(outs["triton"][1].grad, outs["cuda"][1].grad, rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
def test_gpu_new_token_counts_reuse_the_tuned_configs():
    from spa_kernels.ops.logprobs import triton as logprobs_triton

    linear_triton, _ = _linear_modules()
    H, V = 256, 5000
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for T in (17, 100, 333):  # new sequence lengths: same (V, H, dtype), so no new tuning entry
        hidden = torch.randn(2, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, V, (2, T), device="cuda")
        sk.linear_sequence_logprobs(hidden, weight, labels, impl="triton").sum().backward()
        sk.sequence_logprobs(torch.randn(2, T, V, device="cuda", dtype=torch.bfloat16), labels, impl="triton")
    for name in ("_logprobs_fwd_kernel", "_linear_lse_fwd_kernel", "_linear_grad_logits_kernel"):
        kernel = getattr(logprobs_triton if name == "_logprobs_fwd_kernel" else linear_triton, name)
        entries = [k for k in kernel.cache if V in k]  # autotuning cache: (key values..., dtypes...) -> config
        assert len(entries) == 1, (name, list(kernel.cache))
