"""What only the CUDA path has: deferred label validation, launches on the current stream without host syncs (CUDA
graph capture), the linear path's bounded memory, and a CUDA-vs-Triton cross-check at realistic shapes. The shared
suites in tests/ops/ already run impl="cuda" against the float64 oracle; the CPU-side parts (chunk sizing, the
float32 weight-gradient accumulation) run everywhere."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from spa_kernels._accumulate import accumulate_mm
from spa_kernels.ops.linear_logprobs import chunked as linear_fn
from tests.helpers import assert_no_worse, make_labels, make_logits

gpu = pytest.mark.gpu


def _cuda_usable(op="logprobs"):
    reason = _dispatch.impl_unavailable_reason("cuda") or _dispatch._backend_module(op, "cuda")[1]
    if reason:
        pytest.skip(reason)


def _triton_usable(op):
    reason = _dispatch.impl_unavailable_reason("triton") or _dispatch._backend_module(op, "triton")[1]
    if reason:
        pytest.skip(f"no triton implementation of {op}: {reason}")


# ---- chunk sizing and the weight-gradient accumulator (CPU) --------------------------------------------------------
def test_gpu_chunk_size_comes_from_free_memory_and_vocabulary():
    cuda, V, bf16 = torch.device("cuda"), 128256, torch.bfloat16
    row = V * 2
    # plenty free: capped by GPU_CHUNK_BYTES, rounded down to a multiple of 128 tokens
    big = linear_fn.chunk_size_for(10**6, V, bf16, cuda, free_bytes=80 * 2**30)
    assert big == (linear_fn.GPU_CHUNK_BYTES // row) // 128 * 128 == 2048
    # little free: a fraction of it
    small = linear_fn.chunk_size_for(10**6, V, bf16, cuda, free_bytes=2**30)
    assert small * row <= 2**30 * linear_fn.GPU_FREE_FRACTION and small % 128 == 0 and small < big
    # float32 rows are twice as wide; a short input is one chunk; almost nothing free still gives one token
    assert linear_fn.chunk_size_for(10**6, V, torch.float32, cuda, free_bytes=80 * 2**30) == big // 2
    assert linear_fn.chunk_size_for(300, V, bf16, cuda, free_bytes=80 * 2**30) == 300
    assert linear_fn.chunk_size_for(10**6, V, bf16, cuda, free_bytes=1000) == 1
    # the CPU keeps its fixed budget
    assert linear_fn.chunk_size_for(10**6, 1000, torch.float32, torch.device("cpu")) * 4000 <= linear_fn.CHUNK_BYTES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_gradient_accumulates_in_float32_in_bounded_slices(dtype):
    a, b = torch.randn(70, 33).to(dtype), torch.randn(33, 19).to(dtype)
    acc = torch.randn(70, 19)
    want = acc.double() + a.double() @ b.double()
    accumulate_mm(acc, a, b, slice_bytes=5 * (33 + 19) * 4)  # 5-row float32 slices where cuBLAS cannot
    assert acc.dtype == torch.float32
    assert_no_worse(acc, want, atol=1e-2, rtol=1e-2, name="acc")
    same = torch.zeros(4, 3, dtype=torch.float64)
    accumulate_mm(same, torch.ones(4, 2, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64), 8)
    assert bool((same == 2).all())


# ---- label validation ----------------------------------------------------------------------------------------------
def test_label_flag_modes_and_message():
    """The flag reading shared by the GPU backends (the flag lives on the CPU here: the synchronous path)."""
    from spa_kernels import _validation as v

    labels = torch.tensor([[1, 2, 3], [4, 99, -5]])
    flag = torch.tensor([4])  # flat index of labels[1, 1]
    assert v.label_check_for(True) == "sync" and v.label_check_for(False) == "deferred"
    with pytest.raises(ValueError, match=r"^labels\[1, 1\] = 99 is outside \[0, 10\) and is not ignore_index "
                                         r"\(-100\)$"):
        v.check_label_flag(flag, labels, 10, -100)  # "sync" is the default
    with v.label_check("trusted"):
        v.check_label_flag(flag, labels, 10, -100)  # the caller has checked: not read
    v.check_label_flag(torch.tensor([v.NO_BAD_LABEL]), labels, 10, -100)
    with pytest.raises(ValueError, match="label check mode must be one of"):
        with v.label_check("lazy"):
            pass


@gpu
def test_validate_false_defers_the_label_error_without_a_host_sync():
    _cuda_usable()
    sk.flush_label_checks()
    logits = make_logits((2, 4, 123), torch.float32, "cuda").requires_grad_()
    labels = make_labels((2, 4), 123, "cuda", ignore_frac=0.0)
    labels[1, 2] = 500
    out = sk.sequence_logprobs(logits, labels, impl="cuda", validate=False)  # returns without waiting
    ok = labels.clone()
    ok[1, 2] = -100
    torch.testing.assert_close(out, sk.sequence_logprobs(logits.detach(), ok, impl="torch"))  # scored as ignored
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 500 is outside \[0, 123\) and is not ignore_index "
                                         r"\(-100\) \(found on the GPU by an earlier call with validate=False"):
        sk.flush_label_checks()
    sk.flush_label_checks()  # reported once
    out.sum().backward()  # (a backward before the flush could itself have raised: it also checks pending flags)
    assert bool((logits.grad[1, 2] == 0).all()) and torch.isfinite(logits.grad).all()  # never read


@gpu
def test_deferred_label_error_surfaces_at_the_next_cuda_call():
    _cuda_usable()
    sk.flush_label_checks()
    logits = make_logits((2, 3, 50), torch.bfloat16, "cuda")
    labels = make_labels((2, 3), 50, "cuda", ignore_frac=0.0)
    bad = labels.clone()
    bad[0, 1] = -7
    sk.sequence_logprobs(logits, bad, impl="cuda", validate=False)
    torch.cuda.synchronize()  # the flag's copy has landed
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = -7 is outside \[0, 50\)"):
        sk.sequence_logprobs(logits, labels, impl="cuda", validate=False)
    sk.flush_label_checks()


@gpu
def test_spa_validate_true_raises_in_the_call_and_false_defers():
    _cuda_usable("spa_logprobs")
    sk.flush_label_checks()
    logits = make_logits((2, 3, 77), torch.float16, "cuda")
    labels = make_labels((2, 3), 77, "cuda", ignore_frac=0.0)
    labels[1, 0] = 77
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = 77 is outside \[0, 77\)"):
        sk.spa_sequence_logprobs(logits, logits, labels, lam=0.5, impl="cuda")
    sk.spa_sequence_logprobs(logits, logits, labels, lam=0.5, impl="cuda", validate=False)
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = 77"):
        sk.flush_label_checks()


# ---- streams -------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("op", ["logprobs", "spa_logprobs"])
def test_kernels_run_on_the_current_stream_and_capture_in_a_cuda_graph(op):
    """A CUDA graph captures only work issued to the capturing (current) stream, and capture fails on any host
    synchronisation: so a captured forward + backward that replays to the eager result shows both."""
    _cuda_usable(op)
    sk.flush_label_checks()
    V = 5003  # a block per row, odd V: misaligned rows
    logits = make_logits((3, 7, V), torch.bfloat16, "cuda")
    ref = make_logits((3, 7, V), torch.bfloat16, "cuda")
    labels = make_labels((3, 7), V, "cuda")
    x = logits.clone().requires_grad_()

    def step():
        x.grad = None
        if op == "logprobs":
            out = sk.sequence_logprobs(x, labels, impl="cuda", validate=False)
        else:
            out = sk.spa_sequence_logprobs(x, ref, labels, lam=0.3, impl="cuda", validate=False)[0]
        out.sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graph requires
            step()
    torch.cuda.current_stream().wait_stream(side)
    want, want_grad = step().detach().clone(), x.grad.clone()
    sk.flush_label_checks()  # nothing pending while capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    x.data.copy_(logits)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, want_grad, rtol=0, atol=0)


@gpu
def test_side_stream_result_matches_the_default_stream():
    _cuda_usable()
    logits = make_logits((4, 16, 32000), torch.bfloat16, "cuda")
    labels = make_labels((4, 16), 32000, "cuda")
    want = sk.sequence_logprobs(logits, labels, impl="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = logits * 1.0  # produced on the side stream: a kernel on another stream could read it unfinished
        got = sk.sequence_logprobs(x, labels, impl="cuda", validate=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- memory of the linear path -------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_peak_extra_memory_is_one_chunk_of_logits(dtype):
    _cuda_usable("linear_logprobs")
    N, T, H, V, chunk = 2, 1024, 256, 32000, 256
    hidden = torch.randn(N, T, H, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N, T), device="cuda")
    es = hidden.element_size()
    sk.linear_sequence_logprobs(hidden, weight, labels, impl="cuda", chunk_size=chunk).sum().backward()  # warm-up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sk.linear_sequence_logprobs(hidden, weight, labels, impl="cuda", chunk_size=chunk).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the gathered scored hidden rows, their gradient and hidden.grad; weight.grad; the float32 accumulator
    grads = 3 * hidden.numel() * es + weight.numel() * es
    fp32_acc = weight.numel() * 4 if dtype != torch.float32 else 0
    tokens_vectors = 64 * N * T  # [M] index / label / token / lse vectors and their gradients
    # one chunk of logits (+ half a chunk for a product slice where cuBLAS cannot accumulate into float32)
    budget = 1.5 * chunk * V * es + grads + fp32_acc + tokens_vectors + 8 * 2**20
    assert extra <= budget, f"peak extra {extra / 2**20:.1f} MiB > {budget / 2**20:.1f} MiB"
    # never a [N * T, V] logits tensor
    assert extra < N * T * V * es


# ---- CUDA vs Triton ------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_matches_triton_from_logits(V, dtype):
    _cuda_usable()
    _triton_usable("logprobs")
    N, T = 2, 256
    logits = make_logits((N, T, V), dtype, "cuda")
    labels = make_labels((N, T), V, "cuda")
    outs = {}
    for impl in ("cuda", "triton"):
        x = logits.clone().requires_grad_()
        out = sk.sequence_logprobs(x, labels, impl=impl)
        out.sum().backward()
        outs[impl] = (out, x.grad)
    torch.testing.assert_close(outs["cuda"][0], outs["triton"][0], rtol=1e-5, atol=1e-3)
    grad_tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(outs["cuda"][1].float(), outs["triton"][1].float(), rtol=grad_tol, atol=grad_tol)


@gpu
def test_cuda_matches_triton_spa_triple():
    _cuda_usable("spa_logprobs")
    _triton_usable("spa_logprobs")
    V = 128256
    logits = make_logits((2, 128, V), torch.bfloat16, "cuda")
    ref = make_logits((2, 128, V), torch.bfloat16, "cuda")
    labels = make_labels((2, 128), V, "cuda")
    got = sk.spa_sequence_logprobs(logits, ref, labels, lam=0.5, impl="cuda")
    want = sk.spa_sequence_logprobs(logits, ref, labels, lam=0.5, impl="triton")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_matches_triton_linear(dtype):
    _cuda_usable("linear_logprobs")
    _triton_usable("linear_logprobs")
    N, T, H, V = 2, 512, 512, 32000
    hidden = torch.randn(N, T, H, device="cuda").to(dtype)
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5 * 2).to(dtype)
    labels = make_labels((N, T), V, "cuda")
    outs = {}
    for impl in ("cuda", "triton"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = sk.linear_sequence_logprobs(h, w, labels, impl=impl)
        out.sum().backward()
        outs[impl] = (out, h.grad.float(), w.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want, name in zip(outs["cuda"], outs["triton"], ("logps", "grad_hidden", "grad_weight")):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()), msg=name)
