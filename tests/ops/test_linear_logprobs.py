"""linear_sequence_logprobs (hidden states x lm_head weight, no [N,T,V] logits) against a float64 oracle."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch
from tests.conftest import impl_device, impl_params
from tests.helpers import assert_no_worse, eager_token_logprobs, make_labels, oracle_token_logprobs, seq_reduce

IMPLS = impl_params("linear_logprobs")
# Per-token log-prob tolerance: bf16/fp16 logits from a reduced-precision matmul are rounded (eager too).
LOGP_ATOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_linear(N, T, H, V, dtype, dev, bias=True):
    hidden = torch.randn(N, T, H).to(dtype=dtype, device=dev)
    weight = (torch.randn(V, H) / H ** 0.5 * 2).to(dtype=dtype, device=dev)
    b = (torch.randn(V) * 0.5).to(dtype=dtype, device=dev) if bias else None
    return hidden, weight, b


def skip_unusable(impl, **tensors):
    reason = _dispatch.unusable_reason("linear_logprobs", impl, tensors)
    if reason:
        pytest.skip(reason)


def check_linear(impl, hidden, weight, bias, labels, *, ignore_index=-100, average=False, temperature=1.0,
                 chunk_size=None):
    skip_unusable(impl, hidden=hidden, weight=weight, bias=bias, labels=labels)
    dtype = hidden.dtype
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = sk.linear_sequence_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], ignore_index=ignore_index,
                                      average=average, temperature=temperature, impl=impl, chunk_size=chunk_size)
    up = torch.randn_like(out)
    (out * up).sum().backward()

    def run(ts, to, tok_fn):
        h, w, b = ts
        logits = torch.nn.functional.linear(h.to(to), w.to(to), None if b is None else b.to(to))
        return seq_reduce(tok_fn(logits, labels, ignore_index, temperature).to(up.dtype if to != torch.float64
                                                                                 else to), labels, ignore_index,
                          average)

    oracle_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    oracle = run(oracle_leaves, torch.float64, oracle_token_logprobs)
    (oracle * up.double()).sum().backward()
    eager_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    eager = run(eager_leaves, dtype, eager_token_logprobs)
    (eager * up).sum().backward()
    T = hidden.shape[1]
    assert_no_worse(out, oracle, eager, atol=LOGP_ATOL[dtype] * max(T, 1), rtol=1e-5, name=f"{impl} {dtype} logps")
    for name, a, o, e in zip(("hidden", "weight", "bias"), leaves, oracle_leaves, eager_leaves):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == dtype, name
        assert_no_worse(a.grad, o.grad, e.grad, atol=1e-5, rtol=GRAD_RTOL[dtype], name=f"{impl} {dtype} grad {name}")
    return out, leaves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 31, 123), (1, 1, 16, 7), (3, 4, 64, 515)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_oracle(impl, dtype, shape, bias):
    N, T, H, V = shape
    dev = impl_device(impl)
    hidden, weight, b = make_linear(N, T, H, V, dtype, dev, bias)
    labels = make_labels((N, T), V, dev)
    check_linear(impl, hidden, weight, b, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_chunks_average_temperature_ignore_index(impl):
    dev = impl_device(impl)
    hidden, weight, b = make_linear(3, 7, 24, 150, torch.float32, dev)
    labels = make_labels((3, 7), 150, dev, ignore_index=5, ignore_frac=0.3)
    check_linear(impl, hidden, weight, b, labels, ignore_index=5, average=True, temperature=0.8, chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_rows_and_batch(impl):
    dev = impl_device(impl)
    hidden, weight, b = make_linear(2, 4, 16, 60, torch.float32, dev)
    labels = make_labels((2, 4), 60, dev)
    labels[0] = -100
    out, leaves = check_linear(impl, hidden, weight, b, labels)
    assert out[0].item() == 0.0 and bool((leaves[0].grad[0] == 0).all())
    none = torch.full((2, 4), -100, device=dev)
    out, leaves = check_linear(impl, hidden, weight, b, none)
    assert bool((out == 0).all())
    assert all(bool((t.grad == 0).all()) for t in leaves)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_hidden(impl):
    dev = impl_device(impl)
    hidden_t = torch.randn(6, 2, 20, device=dev)
    weight = torch.randn(40, 20, device=dev) / 4
    hidden = hidden_t.transpose(0, 1)[:, 1:]  # [2, 5, 20], non-contiguous, the shifted slice
    labels = make_labels((2, 5), 40, dev)
    check_linear(impl, hidden, weight, None, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label(impl):
    dev = impl_device(impl)
    hidden, weight, _ = make_linear(2, 3, 8, 20, torch.float32, dev, bias=False)
    labels = make_labels((2, 3), 20, dev, ignore_frac=0)
    labels[1, 0] = -3
    skip_unusable(impl, hidden=hidden, weight=weight, labels=labels)
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = -3 is outside \[0, 20\)"):
        sk.linear_sequence_logprobs(hidden, weight, labels, impl=impl)


def test_input_errors():
    h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 8"):
        sk.linear_sequence_logprobs(h, torch.randn(20, 9), y)
    with pytest.raises(TypeError, match="must share a dtype"):
        sk.linear_sequence_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        sk.linear_sequence_logprobs(h, w, y, bias=torch.randn(19))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        sk.linear_sequence_logprobs(h, w, y, chunk_size=0)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_gradcheck_float64(impl):
    if _dispatch.impl_unavailable_reason(impl):
        pytest.skip(_dispatch.impl_unavailable_reason(impl))
    h = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, -100, 6], [0, 2, 3]])
    fn = lambda h, w, b: sk.linear_sequence_logprobs(h, w, y, bias=b, impl=impl, chunk_size=2, temperature=1.3)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [1, 1000, 32000, 128256, 262144, 2**24])
def test_cpu_chunk_within_its_byte_budget(vocab, dtype):
    """The CPU chunk of logits never exceeds CPU_CHUNK_BYTES (unless one token's row alone does), is a multiple of
    128 tokens when it holds 128 or more, and never exceeds the token count."""
    from spa_kernels.ops.linear_logprobs import chunked as fn
    from spa_kernels.ops.linear_logprobs import pair_loss

    cpu = torch.device("cpu")
    row = vocab * torch.empty((), dtype=dtype).element_size()
    chunk = fn.chunk_size_for(10**7, vocab, dtype, cpu)
    assert chunk * row <= max(fn.CPU_CHUNK_BYTES, row)
    assert chunk < 128 or chunk % 128 == 0
    assert fn.chunk_size_for(5, vocab, dtype, cpu) == min(5, chunk)
    # fused pair loss: a whole pair when its logits fit PAIR_CHUNK_BYTES, else the usual chunk
    for lengths in ([300, 500, 40, 40], [5000, 6000], [1, 1]):
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        pair = pair_loss.pair_chunk_size(offsets, vocab, dtype, cpu)
        longest = max(lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2))
        assert pair * row <= max(pair_loss.PAIR_CHUNK_BYTES, row)
        assert pair == (longest if chunk < longest <= pair_loss.PAIR_CHUNK_BYTES // row else
                        fn.chunk_size_for(offsets[-1], vocab, dtype, cpu))


@pytest.mark.parametrize("chunk", [1, 5, 8, 13, 100])
def test_pair_batches_cover_every_pair_within_the_chunk(chunk):
    from spa_kernels.ops.linear_logprobs.pair_loss import pair_batches

    lengths = [3, 4, 0, 0, 7, 6, 1, 0, 2, 2, 9, 9]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    batches = pair_batches(offsets, chunk)
    assert [p for a, b in batches for p in range(a, b)] == list(range(len(lengths) // 2))
    for a, b in batches:
        assert b - a == 1 or offsets[2 * b] - offsets[2 * a] <= chunk
    assert pair_batches([0], chunk) == []
