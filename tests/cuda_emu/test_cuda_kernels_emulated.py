"""The CUDA log-prob kernels' own source, run on the CPU by a small emulator (tests/cuda_emu/cuda_emu.h): indexing,
16-byte row splits at every misalignment, warp-per-row and block-per-row launches, merges, in-place order, label
flags. Runs wherever a C++ compiler and the CUDA headers are (CI included); on a GPU the same properties are tested
natively by tests/ops/ and tests/ops/test_cuda.py, and races by scripts/sanitize_cuda.sh."""

import platform

import pytest
import torch

from tests.cuda_emu import build
from tests.helpers import assert_no_worse, eager_token_logprobs, make_labels, make_logits, oracle_token_logprobs

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="the emulator uses ucontext (Linux)"),
    pytest.mark.skipif(build.cuda_include() is None, reason="no CUDA headers (set CUDA_HOME)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
AUTO, WARP = -1, 1  # launch modes of the harness; (0, threads) = block per row with that many threads
LAUNCHES = {"auto": (AUTO, 0), "warp": (WARP, 0), "block128": (0, 128), "block512": (0, 512)}
NO_BAD = torch.iinfo(torch.int64).max


@pytest.fixture(scope="module")
def emu():
    return build.load()


def _forward_backward(emu, logits, labels, launch, ignore_index=-100, inv_t=1.0, grad_out=None, g=None):
    tok, lse, bad = emu.logprobs_forward(logits, labels, ignore_index, inv_t, *launch)
    g = torch.randn(labels.shape) if g is None else g
    grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype) if grad_out is None else grad_out
    emu.logprobs_backward(g, logits, labels, lse, ignore_index, inv_t, grad, *launch)
    return tok, lse, bad, grad, g


def _check(emu, logits, labels, launch, ignore_index=-100, temperature=1.0, grad_out=None):
    dtype = logits.dtype
    tok, _, bad, grad, g = _forward_backward(emu, logits, labels, launch, ignore_index, 1.0 / temperature, grad_out)
    xo = logits.detach().double().requires_grad_()
    oracle = oracle_token_logprobs(xo, labels, ignore_index, temperature)
    (oracle * g.double()).sum().backward()
    xe = logits.detach().clone().requires_grad_()
    eager = eager_token_logprobs(xe, labels, ignore_index, temperature).float()
    (eager * g).sum().backward()
    assert_no_worse(tok, oracle, eager, atol=1e-5, rtol=1e-5, name=f"{dtype} token")
    assert_no_worse(grad, xo.grad, xe.grad, atol=1e-6, rtol=GRAD_RTOL[dtype], name=f"{dtype} grad")
    assert int(bad) == NO_BAD
    return tok, grad


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 123, 1031, 2100, 40000])
def test_logprobs_match_oracle(emu, launch, dtype, V):
    logits = make_logits((2, 3, V), dtype)
    labels = make_labels((2, 3), V)
    _check(emu, logits, labels, launch)


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_at_every_misalignment_and_in_place(emu, launch, dtype):
    """Rows starting at every offset from a 16-byte boundary; the gradient into a fresh buffer (other phases: the
    element-wise path), into a view of the same phase, and in place; all three must agree exactly."""
    N, T, V, pad = 2, 4, 301, 3  # row stride V + pad: consecutive rows shift phase
    for offset in range(8):
        base = make_logits((N * T * (V + pad) + offset,), dtype)
        logits = base[offset:].view(N, T, V + pad)[:, :, :V]
        labels = make_labels((N, T), V, ignore_index=-100, ignore_frac=0.2)
        labels[0, 0] = V - 1  # the label in a row's scalar tail
        labels[1, 0] = 0  # ... and head
        g = torch.randn(N, T)
        g[1, 2] = 0.0  # a zero upstream gradient gives a zero row
        _, _, _, fresh, _ = _forward_backward(emu, logits, labels, launch, g=g)
        twin = torch.full_like(base, float("nan"))[offset:].view(N, T, V + pad)[:, :, :V]
        _, _, _, same_phase, _ = _forward_backward(emu, logits, labels, launch, grad_out=twin, g=g)
        inplace = logits.clone(memory_format=torch.preserve_format)
        in_base = base.clone()
        inplace = in_base[offset:].view(N, T, V + pad)[:, :, :V]
        _, _, _, result, _ = _forward_backward(emu, inplace, labels, launch, grad_out=inplace, g=g)
        assert torch.equal(fresh, same_phase), f"offset {offset}: phase-matched view differs"
        assert torch.equal(fresh, result), f"offset {offset}: in-place differs"
        assert bool((fresh[1, 2] == 0).all()) and bool((fresh[labels == -100] == 0).all())
        gaps = lambda t, o=offset: t[o:].view(N, T, V + pad)[:, :, V:]
        assert torch.equal(gaps(in_base), gaps(base)), "the backward wrote outside its rows"
        _check(emu, logits, labels, launch)


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_bad_labels_are_flagged_never_read(emu, launch):
    V = 64
    logits = make_logits((3, 4, V), torch.float32)
    labels = make_labels((3, 4), V, ignore_frac=0.0)
    labels[2, 3] = V
    labels[1, 1] = -(10**12)  # far outside: a read would fault
    labels[2, 0] = 10**12
    tok, lse, bad, grad, _ = _forward_backward(emu, logits, labels, launch)
    assert int(bad) == 1 * 4 + 1  # the smallest flat index
    bad_rows = (labels < 0) | (labels >= V)
    assert bool((tok[bad_rows] == 0).all()) and bool((lse[bad_rows] == 0).all())
    assert bool((grad[bad_rows] == 0).all()) and torch.isfinite(grad).all()
    ok = ~bad_rows
    assert_no_worse(tok[ok], oracle_token_logprobs(logits, labels.clamp(0, V - 1))[ok], atol=1e-5, name="token")


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_huge_logits_and_temperature(emu, launch, dtype):
    V = 1500
    logits = make_logits((2, 5, V), dtype)
    logits[torch.rand(2, 5, V) < 0.2] = float("-inf")
    logits[0, 1, :1100] = float("-inf")  # a long run of -inf, then finite values
    logits[1, 4, :] = float("-inf")
    logits[1, 4, 17] = 2.0  # one finite value
    labels = make_labels((2, 5), V)
    finite = torch.isfinite(logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    labels = labels.masked_fill(~finite, -100)
    labels[1, 4] = 17
    tok, grad = _check(emu, logits, labels, launch, temperature=0.7)
    assert torch.isfinite(tok).all() and torch.isfinite(grad).all()
    assert abs(tok[1, 4].item()) < 1e-6  # the only finite logit has probability 1
    huge = make_logits((2, 4, 300), dtype, scale=1e4 if dtype != torch.float16 else 5e3)
    _check(emu, huge, make_labels((2, 4), 300), launch)
    # a label on a -inf logit gives -inf, like the reference
    on_inf = make_logits((1, 2, 40), dtype)
    on_inf[0, 0, 5] = float("-inf")
    tok, _, _ = emu.logprobs_forward(on_inf, torch.tensor([[5, 6]]), -100, 1.0, *launch)
    assert tok[0, 0].item() == float("-inf") and torch.isfinite(tok[0, 1])


def _spa_oracle(logits, ref_logits, labels, lam):
    z, zr = logits.double(), ref_logits.double()
    ext = torch.where(z == float("-inf"), z, (1 + lam) * z - lam * zr)
    return [oracle_token_logprobs(t, labels) for t in (z, zr, ext)]


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [9, 123, 2100, 20000])
def test_spa_triple_matches_oracle(emu, launch, dtype, V):
    logits = make_logits((2, 3, V), dtype)
    ref_logits = (logits.float() + make_logits((2, 3, V), torch.float32, scale=0.5)).to(dtype)
    labels = make_labels((2, 3), V)
    labels[0, 0] = 10**12  # flagged, scored as ignored
    tok, lse, ref, ext, bad = emu.spa_logprobs_forward(logits, ref_logits, labels, -100, 0.5, *launch)
    assert int(bad) == 0
    labels[0, 0] = -100
    o_tok, o_ref, o_ext = _spa_oracle(logits, ref_logits, labels, 0.5)
    assert_no_worse(tok, o_tok, atol=2e-5, rtol=1e-5, name="logps")
    assert_no_worse(ref, o_ref, atol=2e-5, rtol=1e-5, name="ref_logps")
    assert_no_worse(ext, o_ext, atol=2e-5, rtol=1e-5, name="extrapolated")
    scored = labels != -100
    assert_no_worse(lse[scored], torch.logsumexp(logits.double(), -1)[scored], atol=2e-5, rtol=1e-6, name="lse")


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
def test_spa_misaligned_reference_and_padded_vocabulary(emu, launch):
    N, T, V = 2, 4, 300
    logits = make_logits((N, T, V), torch.bfloat16)
    ref_base = make_logits((N * T * (V + 1) + 3,), torch.bfloat16)
    ref_logits = ref_base[3:].view(N, T, V + 1)[:, :, :V]  # a different phase from logits: element-wise path
    logits[..., 250:] = float("-inf")
    ref_logits[..., 250:] = float("-inf")
    labels = make_labels((N, T), 250)
    tok, _, ref, ext, bad = emu.spa_logprobs_forward(logits, ref_logits, labels, -100, 0.25, *launch)
    assert int(bad) == NO_BAD
    for got, want, name in zip((tok, ref, ext), _spa_oracle(logits, ref_logits, labels, 0.25),
                               ("logps", "ref", "ext")):
        assert torch.isfinite(got).all(), name
        assert_no_worse(got, want, atol=2e-5, rtol=1e-5, name=name)


def test_launch_shapes(emu):
    # (warp_per_row, blocks, threads): a warp per row up to 4 KiB rows, 8 rows per block; then a block per row
    assert emu.launch_shape(10, 2048, 2) == [1, 2, 256]
    assert emu.launch_shape(10, 1024, 4) == [1, 2, 256]
    assert emu.launch_shape(10, 2049, 2) == [0, 10, 256]
    assert emu.launch_shape(10, 32000, 2) == [0, 10, 256]
    assert emu.launch_shape(10, 32768, 2) == [0, 10, 512]
    assert emu.launch_shape(10, 128256, 2) == [0, 10, 512]


def _strided_rows(dtype, N, T, V, offset, pad=0, fill=None):
    """[N, T, V] logits whose rows start `offset` elements past a 16-byte boundary (row stride V + pad)."""
    base = make_logits((N * T * (V + pad) + offset,), dtype)
    if fill is not None:
        base.fill_(fill)
    return base[offset:].view(N, T, V + pad)[:, :, :V]


# (V, positions of the bad value): the scalar head, the first pack, a thread's tail with no full pack, the row's end
NAN_LAYOUTS = [(37, (0, 1, 2, 5, 36)), (301, (0, 3, 8, 150, 300)), (2100, (0, 1, 7, 1029, 2099))]


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("background", ["random", "-inf"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_nan_and_plus_inf_give_a_nan_row_at_every_layout(emu, launch, dtype, background, bad):
    """Wherever the bad value sits (head, pack, tail; rows at every 16-byte phase; the rest random or -inf), its
    row's log-prob and every entry of its gradient are NaN, as with torch.log_softmax; the other rows are exact."""
    for V, positions in NAN_LAYOUTS:
        for offset in (0, 1, 3):
            N, T = 1, len(positions)
            logits = _strided_rows(dtype, N, T, V, offset, pad=1)
            if background == "-inf":
                logits[0, :, :] = float("-inf")
            for t, pos in enumerate(positions):
                logits[0, t, pos] = bad
            labels = torch.full((N, T), (V - 1) // 2)
            g = torch.rand(N, T) + 0.5
            tok, lse, bad_flag, grad, _ = _forward_backward(emu, logits, labels, launch, g=g)
            assert int(bad_flag) == NO_BAD
            for t, pos in enumerate(positions):
                assert torch.isnan(tok[0, t]) and torch.isnan(lse[0, t]), \
                    f"V={V} offset={offset} at {pos}: token {tok[0, t].item()}, lse {lse[0, t].item()}"
                assert torch.isnan(grad[0, t]).all(), f"V={V} offset={offset} at {pos}: gradient not all NaN"
    # the same rows with the bad value removed are exact (nothing else was disturbed)
    logits = _strided_rows(dtype, 2, 3, 301, 3, pad=1)
    _check(emu, logits, make_labels((2, 3), 301), launch)


def test_issue_examples_fp32_offset_3_and_bf16(emu):
    """fp32 V = 32003 at storage offset 3 with a NaN at index 0, and bf16 with a NaN at index 1: NaN (were finite)."""
    for dtype, pos in [(torch.float32, 0), (torch.bfloat16, 1)]:
        logits = _strided_rows(dtype, 1, 2, 32003, 3)
        logits[0, 0, pos] = float("nan")
        tok, lse, _ = emu.logprobs_forward(logits, torch.tensor([[5, 5]]), -100, 1.0, AUTO, 0)
        assert torch.isnan(tok[0, 0]), f"{dtype}: {tok[0, 0].item()}"
        assert torch.isfinite(tok[0, 1])


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
@pytest.mark.parametrize("where", ["policy", "reference"])
def test_spa_nan_in_the_first_elements_of_misaligned_rows(emu, launch, where):
    """The element-by-element path (policy and reference rows at different 16-byte phases): a NaN among the first
    `nthreads` elements is the first value its thread sees."""
    N, T, V = 1, 6, 300
    logits = _strided_rows(torch.bfloat16, N, T, V, 0, pad=0)
    ref_logits = _strided_rows(torch.bfloat16, N, T, V, 3, pad=1)  # a different phase: element-wise path
    target = logits if where == "policy" else ref_logits
    positions = (0, 1, 5, 31, 64, 127)
    for t, pos in enumerate(positions):
        target[0, t, pos] = float("nan")
    labels = torch.full((N, T), 200)
    tok, lse, ref, ext, bad = emu.spa_logprobs_forward(logits, ref_logits, labels, -100, 0.5, *launch)
    assert int(bad) == NO_BAD
    policy = where == "policy"
    assert bool(torch.isnan(tok).all()) == policy and bool(torch.isnan(lse).all()) == policy
    assert bool(torch.isnan(ref).all()) == (not policy)
    assert torch.isnan(ext).all()
    assert (torch.isfinite(ref) if policy else torch.isfinite(tok)).all()


@pytest.mark.parametrize("launch", [LAUNCHES["warp"], LAUNCHES["block128"]], ids=["warp", "block128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_huge_logits_at_a_temperature(emu, launch, dtype, temperature):
    """|x / T| ~ 4e4: the scaled logit is rounded once and the same in forward and backward, so the top logit's
    probability is exactly 1 where it dominates (an FMA in the forward only put ~1e-3 into the gradient)."""
    logits = make_logits((2, 4, 300), dtype, scale=1e4)
    _check(emu, logits, make_labels((2, 4), 300), launch, temperature=temperature)
