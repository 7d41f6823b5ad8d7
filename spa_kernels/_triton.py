"""Shared plumbing of the Triton backends (spa_kernels/ops/*/triton.py): interpreter detection, autotuning that
collapses to one configuration under TRITON_INTERPRET=1, the tl.dot precision for a dtype, and the label-range error.

Interpreter caveats the kernels work around (triton 3.8): bfloat16 values are held as their raw 16-bit patterns, so
arithmetic and tl.dot on bfloat16 operands give garbage. Kernels therefore convert every load to float32 before any
arithmetic, and feed tl.dot float32 operands when DOT_F32 is set (only ever under the interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._validation import NO_BAD_LABEL, check_label_flag, label_check

# Read once, like triton itself: TRITON_INTERPRET must be set before any @triton.jit function is defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Shared memory one block may use (the opt-in maximum), by compute capability; the GPU's own value is used at run time.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def autotune(configs: list[triton.Config], key: list[str], interpret: triton.Config, shared_memory=None, **kwargs):
    """triton.autotune over `configs` on a GPU; under the interpreter only `interpret` (a single config is never
    benchmarked), so CPU tests compile and run each kernel once per call.

    shared_memory(config, args) -> bytes estimates what a configuration needs for these arguments (e.g. its
    pipelined tl.dot operand tiles, which depend on the dtype): configurations that cannot fit the tensors' GPU are
    dropped before autotuning instead of failing to launch (prune_for_arch), and spa_kernels.compile_check checks
    the estimate against the compiler's figure for every configuration it compiles."""
    if INTERPRET:
        return triton.autotune(configs=[interpret], key=key, **kwargs)

    def prune(configs, named_args, **_):
        return prune_for_arch(configs, named_args, capability_of(named_args), shared_memory)

    decorate = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **kwargs)

    def wrap(fn):
        tuner = decorate(fn)
        tuner.spa_shared_memory = shared_memory  # read by compile_check for other architectures
        return tuner

    return wrap


def capability_of(named_args: dict) -> int:
    """Compute capability (e.g. 90) of the GPU holding the launch's tensors (the current GPU if none is a tensor)."""
    device = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def shared_limit(capability: int, device: torch.device | None = None) -> int:
    """Shared memory one block may use: the device's own figure when it has this capability, else the table's."""
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if 10 * props.major + props.minor == capability:
            return props.shared_memory_per_block_optin
    return SHARED_LIMIT.get(capability, min(SHARED_LIMIT.values()))


def prune_for_arch(configs, named_args: dict, capability: int, shared_memory=None) -> list:
    """The configurations whose estimated shared memory fits sm_<capability>; `configs` may be an autotuner (its
    configurations and estimator are used). Never empty: when nothing fits, the smallest configuration is kept, so
    the launch fails with Triton's own out-of-resources error rather than an empty autotuner (the compile check
    flags any such kernel)."""
    if shared_memory is None:
        shared_memory = getattr(configs, "spa_shared_memory", None)
    configs = list(getattr(configs, "configs", configs))
    if shared_memory is None or not configs:
        return configs
    device = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)
    limit = shared_limit(capability, device)
    kept = [c for c in configs if shared_memory(c, named_args) <= limit]
    return kept or [min(configs, key=lambda c: shared_memory(c, named_args))]


def dot_tile_bytes(*operand_ptrs: str):
    """Estimator for tiled tl.dot kernels: num_stages buffers of a (BLOCK_M x BLOCK_K, BLOCK_K x BLOCK_N) operand
    pair in the operands' element size. Several pairs of pointer arguments (e.g. "h_ptr", "w_ptr", "rh_ptr",
    "rw_ptr") are dot loops that run one after the other in the kernel and reuse the buffers: the largest counts."""
    def estimate(config, args) -> int:
        kw = config.kwargs
        largest = 0
        for a, b in zip(operand_ptrs[::2], operand_ptrs[1::2]):
            size = max(args[a].element_size(), args[b].element_size())
            largest = max(largest, (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * size)
        return config.num_stages * largest
    return estimate


if INTERPRET or torch.version.hip:
    @triton.jit
    def scale(x, factor):
        """x * factor (numpy never fuses it into a later add; ROCm has no PTX)."""
        return x * factor
else:
    @triton.jit
    def scale(x, factor):
        """x * factor as a float32 multiply rounded once: mul.rn is never contracted into an FMA with a later add, so
        forward and backward kernels see the same scaled logit (at |logit / T| ~ 5e4 a fused rounding moves
        exp(u - lse) by ~0.4%), as the CUDA kernels' __fmul_rn."""
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, factor], dtype=tl.float32,
                                         is_pure=True, pack=1)


def dot_precision() -> str:
    """tl.dot input precision for float32 operands, following torch.set_float32_matmul_precision ("highest", the
    default, means full float32 as torch.mm does). Reduced-precision operands ignore it."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_f32(*dtypes: torch.dtype) -> bool:
    """Whether the kernels must upcast tl.dot operands (the interpreter's bfloat16 tl.dot is wrong)."""
    return INTERPRET and torch.bfloat16 in dtypes


def new_bad_row_flag(device: torch.device) -> torch.Tensor:
    """[1] int64 the kernels lower (tl.atomic_min) to the first flat row whose label is out of range."""
    return torch.full((1,), NO_BAD_LABEL, dtype=torch.int64, device=device)


def raise_if_bad_label(flag: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises the shared ValueError (first bad position) when a kernel flagged an out-of-range label: always in
    the call (one host sync), whatever validate= says; the kernels themselves never read out of bounds for such a
    label."""
    with label_check("sync"):
        check_label_flag(flag, labels, vocab, ignore_index)


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors, to size grids; a small stand-in under the interpreter so split paths get tested."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
