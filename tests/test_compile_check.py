"""Native GPU compilation without a GPU (spa_kernels.compile_check): every Triton kernel compiles to a cubin for
sm_80 and sm_90 through its real wrapper, no kept autotune configuration exceeds the architecture's shared memory,
and no reduced-precision kernel spills registers on sm_90. The fast form (one configuration per kernel, dtype and
arch) runs by default; `pytest -m slow` compiles every configuration at two vocabulary sizes (384 compiles: about 11
minutes on 2 busy cores with an empty Triton cache, benchmarks/results/compile_check_triton.txt). The CUDA
kernels' resource report reads the built extension."""

import os
import subprocess
import sys

import pytest
import torch

from spa_kernels import _dispatch, _ext, _triton, compile_check

KERNELS = ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_spa_logprobs_fwd_kernel", "_linear_lse_fwd_kernel",
           "_linear_grad_logits_kernel", "_linear_spa_fwd_kernel")


def _triton_or_skip():
    if _dispatch._triton_import_error():
        pytest.skip(_dispatch._triton_import_error())


def _run(*args, timeout):
    # a process of its own: the tests' TRITON_INTERPRET=1 would replace the kernels by the interpreter's
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "spa_kernels.compile_check", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_clean(out):
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    for name in KERNELS:
        assert name in out.stdout, f"{name} was not compiled:\n{out.stdout[-3000:]}"
    for arch in ("sm_80", "sm_90"):
        assert arch in out.stdout
    assert "0 problem(s)" in out.stdout


def test_every_kernel_compiles_natively_for_sm80_and_sm90():
    _triton_or_skip()
    out = _run("--representative", timeout=1200)
    print(out.stdout)
    _assert_clean(out)


@pytest.mark.slow
def test_every_autotune_configuration_compiles_fits_and_does_not_spill():
    _triton_or_skip()
    out = _run(timeout=3 * 3600)
    print(out.stdout)
    _assert_clean(out)


def test_problems_flag_errors_overflows_and_reduced_precision_spills():
    R = compile_check.Result
    ok = R("k", "c", 90, "bfloat16", "cfg", regs=128, shared=98304)
    fp32_spill = R("k", "c", 90, "float32", "cfg", regs=255, spill_stores=64, shared=1024)
    sm80_spill = R("k", "c", 80, "bfloat16", "cfg", regs=255, spill_stores=8, shared=1024)
    assert compile_check.problems([ok, fp32_spill, sm80_spill]) == []
    too_big = R("k", "c", 80, "float32", "cfg", shared=294912)
    spill = R("k", "c", 90, "float16", "cfg", regs=255, spill_stores=24)
    broken = R("k", "c", 90, "bfloat16", "cfg", error="CompilationError: boom")
    found = compile_check.problems([too_big, spill, broken])
    assert len(found) == 3
    assert "294912" in found[0] and "spills 24 B" in found[1] and "boom" in found[2]


def test_shared_memory_pruning_follows_dtype_and_architecture():
    import triton

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    estimate = _triton.dot_tile_bytes("h_ptr", "w_ptr")
    t = lambda dtype: torch.empty(0, dtype=dtype, device="meta")  # noqa: E731
    fp32 = {"h_ptr": t(torch.float32), "w_ptr": t(torch.float32)}
    bf16 = {"h_ptr": t(torch.bfloat16), "w_ptr": t(torch.bfloat16)}
    assert estimate(big, fp32) == 3 * (128 + 256) * 64 * 4 == 294912  # the compiler's figure for this tile
    assert _triton.prune_for_arch([big, small], fp32, 90, estimate) == [small]
    assert _triton.prune_for_arch([big, small], bf16, 90, estimate) == [big, small]
    assert _triton.prune_for_arch([big, small], bf16, 80, estimate) == [big, small]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_tuned_kernel_keeps_a_fitting_configuration_on_every_architecture(dtype):
    """The real configuration lists and estimators (the autotuners themselves hold one configuration under the
    interpreter): on every architecture in the table, in every dtype, at least one configuration fits."""
    from spa_kernels.ops.linear_logprobs import triton as lin
    from spa_kernels.ops.linear_spa_logprobs import triton as lin_spa

    t = torch.empty(0, dtype=dtype, device="meta")
    kernels = {"linear": (lin._TILE_CONFIGS, _triton.dot_tile_bytes("h_ptr", "w_ptr"), {"h_ptr": t, "w_ptr": t}),
               "linear_spa": (lin_spa._SPA_TILE_CONFIGS, _triton.dot_tile_bytes("h_ptr", "w_ptr", "rh_ptr", "rw_ptr"),
                              {"h_ptr": t, "w_ptr": t, "rh_ptr": t, "rw_ptr": t})}
    for name, (configs, estimate, args) in kernels.items():
        for arch, limit in _triton.SHARED_LIMIT.items():
            kept = _triton.prune_for_arch(configs, args, arch, estimate)
            assert kept and all(estimate(c, args) <= limit for c in kept), (name, arch, dtype)
    # nothing fits: the smallest configuration is kept (the launch then reports Triton's out-of-resources error)
    huge = [c for c in lin._TILE_CONFIGS]
    assert _triton.prune_for_arch(huge, {"h_ptr": t, "w_ptr": t}, 80, lambda c, a: 10**9 + c.num_stages) == \
        [min(huge, key=lambda c: c.num_stages)]


def test_cuda_kernel_resources_are_reported_for_every_built_arch():
    info = _ext.build_info()
    if not info.get("cuda"):
        pytest.skip(f"the CUDA kernels were not built: {_ext.cuda_unavailable_reason()}")
    rows = compile_check.cuda_resources()
    print(compile_check.format_cuda(rows))
    built = {int(a.replace(".", "").replace("+PTX", "")) for a in info["cuda_archs"].split(";") if a}
    assert {r["arch"] for r in rows} == built
    names = " ".join(r["kernel"] for r in rows)
    assert "logprobs" in names and "spa" in names
    assert all(r["regs"] > 0 for r in rows)
    # no kernel spills or keeps a stack frame (local memory) on any built architecture
    assert [r for r in rows if r["local"] or r["stack"]] == []
