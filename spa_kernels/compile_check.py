"""Native compilation of every Triton kernel for NVIDIA GPUs, without a GPU, and the CUDA kernels' resource usage.

    python -m spa_kernels.compile_check                      # every kernel x config x dtype, sm_80 and sm_90
    python -m spa_kernels.compile_check --representative     # one config per kernel and dtype (CI's fast form)
    python -m spa_kernels.compile_check --cuda               # registers / spills / shared memory of spa_kernels._C

Each Triton kernel is reached through its real wrapper (the function the backend calls), called on meta tensors:
the launch is intercepted, so the argument values, dtypes, constexprs and integer specialisations compiled here are
exactly the ones the wrapper would launch with. Every autotune configuration the GPU would try (after the
shared-memory pruning in spa_kernels._triton) is then compiled by Triton's own compiler for a `GPUTarget` down to
a cubin (Triton's bundled ptxas), and ptxas's resource report is parsed: registers, spill stores/loads, stack
frame, and the shared memory the kernel needs at launch. A case fails when the compiler fails, when a kept
configuration needs more shared memory than the architecture allows (also the one prune_for_arch keeps when
nothing fits), when the pruning's estimate is below the compiler's figure, or when a bf16 / fp16 kernel spills
registers on sm_90.

The CUDA kernels' resources come from the built extension itself (`cuobjdump -res-usage` on spa_kernels._C, using
the cuobjdump Triton ships): registers, local memory (spills and stack) and static shared memory per kernel and
architecture. The build also asks ptxas to warn about spills (-warn-spills, setup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from ._triton import SHARED_LIMIT  # shared memory a block may use (opt-in maximum), by compute capability

ARCHS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Launch:
    """One intercepted launch: the JIT function, the configurations autotuning would try, and the arguments."""
    kernel: str
    jit: object
    configs: list  # [(label, {constexpr / option kwargs}, estimated shared memory or None)]
    args: dict  # argument name -> value, before autotune / heuristics values


@dataclass
class Result:
    kernel: str
    case: str
    arch: int
    dtype: str
    config: str
    regs: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    estimate: int | None = None  # the autotuner's shared-memory estimate (pruning), None where it has none
    error: str | None = None
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= SHARED_LIMIT.get(self.arch, min(SHARED_LIMIT.values()))


class _Captured(Exception):
    def __init__(self, launch: Launch):
        super().__init__(launch.kernel)
        self.launch = launch


def _config_kwargs(config) -> dict:
    kw = dict(config.kwargs)
    kw.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return kw


def _config_label(kw: dict) -> str:
    parts = [f"{k}={v}" for k, v in kw.items() if k not in ("num_warps", "num_stages")]
    return " ".join(parts + [f"w{kw.get('num_warps', 4)}", f"s{kw.get('num_stages', 3)}"])


@contextlib.contextmanager
def _intercept(arch: int):
    """Replaces Autotuner.run / JITFunction.run with a capture of the launch; the autotuner's shared-memory pruning
    sees `arch` as the device."""
    from triton.runtime import autotuner, jit

    from . import _triton

    def autotuned_run(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args)) | kwargs
        inner, heur = self.fn, {}
        while not isinstance(inner, jit.JITFunction):  # Heuristics wrappers
            heur.update(getattr(inner, "values", {}))
            inner = inner.fn
        configs = []
        estimate = getattr(self, "spa_shared_memory", None)
        for config in _triton.prune_for_arch(self, named, arch):  # what the GPU would try after pruning
            kw = _config_kwargs(config)
            full = named | kw
            for name, fn in heur.items():
                kw[name] = fn(full)
            configs.append((_config_label(_config_kwargs(config)), kw,
                            None if estimate is None else estimate(config, named)))
        raise _Captured(Launch(inner.__name__, inner, configs, named))

    def jit_run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        named |= {k: v for k, v in kwargs.items() if k not in opts}
        raise _Captured(Launch(self.__name__, self, [(_config_label(opts), opts, None)], named))

    saved = autotuner.Autotuner.run, jit.JITFunction.run
    autotuner.Autotuner.run, jit.JITFunction.run = autotuned_run, jit_run
    try:
        yield
    finally:
        autotuner.Autotuner.run, jit.JITFunction.run = saved


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cases(dtype: torch.dtype, vocab: int, hidden: int, tokens: int = 1000):
    """(kernel case name, zero-argument call of the wrapper) for every Triton kernel, at one vocabulary / hidden size,
    as the backends call them (bias-free and biased linear heads; softcap on and off)."""
    from .ops.linear_logprobs import triton as lin
    from .ops.linear_spa_logprobs import triton as lin_spa
    from .ops.logprobs import triton as lp
    from .ops.spa_logprobs import triton as spa

    N, T = 2, tokens // 2
    labels = _meta(N, T, dtype=torch.long)
    flat = _meta(N * T, dtype=torch.long)
    logits = _meta(N, T, vocab, dtype=dtype)
    h, w, b = _meta(N * T, hidden, dtype=dtype), _meta(vocab, hidden, dtype=dtype), _meta(vocab, dtype=dtype)
    lse, g = _meta(N * T), _meta(N * T)
    cases = [
        ("logprobs.forward", lambda: lp.forward(logits, labels, -100, 1.0)),
        ("logprobs.backward", lambda: lp.backward(_meta(N, T), logits, labels, _meta(N, T), -100, 1.0)),
        ("spa_logprobs.forward", lambda: spa.forward(logits, logits, labels, -100, 0.5)),
        ("linear.forward", lambda: lin.linear_lse_forward(h, w, None, flat, 1.0)),
        ("linear.forward+bias+softcap", lambda: lin.linear_lse_forward(h, w, b, flat, 1.0, 30.0)),
        ("linear.backward", lambda: lin.linear_backward(g, h, w, None, flat, lse, 1.0, None, (True, True, False))),
        ("linear.backward+bias+softcap",
         lambda: lin.linear_backward(g, h, w, b, flat, lse, 1.0, None, (True, True, True), 30.0)),
        ("linear_spa.forward", lambda: lin_spa.linear_spa_forward(h, w, None, h, w, None, flat, 0.5)),
    ]
    return cases


def capture(call, arch: int) -> Launch:
    with _intercept(arch):
        try:
            call()
        except _Captured as c:
            return c.launch
    raise RuntimeError("the wrapper returned without launching a Triton kernel")


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found in triton's package ({path}) nor on PATH")
    return found


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from ptxas -v for one kernel's PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(used.group(1)), int(spill.group(2)), int(spill.group(3)), int(spill.group(1))


def compile_launch(launch: Launch, kw: dict, arch: int):
    """Compiles one configuration of a captured launch for sm_<arch>; returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.jit
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    args = {k: v for k, v in (launch.args | kw).items() if k in jit.arg_names}
    opts = {k: v for k, v in kw.items() if k not in jit.arg_names} | {"debug": False}
    bound, specialization, options = binder(**args, **opts)
    options, signature, constexprs, attrs = jit._pack_args(backend, opts, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)


def check(archs=ARCHS, dtypes=DTYPES, sizes=((32000, 4096), (128256, 4096)), representative: bool = False,
          progress=None) -> list[Result]:
    """Compiles every case; representative=True keeps the first configuration of each kernel / dtype / arch."""
    results = []
    for arch in archs:
        for dtype in dtypes:
            for vocab, hidden in sizes[:1] if representative else sizes:
                for case, call in _cases(dtype, vocab, hidden):
                    tag = f"V={vocab} H={hidden}"
                    try:
                        launch = capture(call, arch)
                    except Exception as e:  # noqa: BLE001 - reported as this case's failure
                        results.append(Result(case, tag, arch, str(dtype).replace("torch.", ""), "-",
                                              error=f"{type(e).__name__}: {e}"))
                        continue
                    configs = launch.configs[:1] if representative else launch.configs
                    if not configs:
                        results.append(Result(case, tag, arch, str(dtype).replace("torch.", ""), "-",
                                              error="the autotuner has no configuration"))
                    for label, kw, estimate in configs:
                        r = Result(f"{case} ({launch.kernel})", tag, arch, str(dtype).replace("torch.", ""), label,
                                   estimate=estimate)
                        try:
                            ck = compile_launch(launch, kw, arch)
                            r.shared = int(ck.metadata.shared)
                            r.regs, r.spill_stores, r.spill_loads, r.stack = ptxas_report(ck.asm["ptx"], arch)
                        except Exception as e:  # noqa: BLE001
                            r.error = f"{type(e).__name__}: {str(e)[-500:]}"
                        results.append(r)
                        if progress:
                            progress(r)
    return results


def format_results(results: list[Result]) -> str:
    head = f"{'kernel':52s} {'arch':5s} {'dtype':9s} {'case':20s} {'config':38s} {'regs':>4s} {'spill st/ld':>11s} " \
           f"{'smem':>7s} verdict"
    lines = [head, "-" * len(head)]
    for r in results:
        verdict = "COMPILE ERROR: " + r.error if r.error else ("ok" if r.fits else "EXCEEDS SHARED MEMORY")
        if not r.error and r.spill_stores:
            verdict += " (spills)"
        lines.append(f"{r.kernel:52s} sm_{r.arch:<2d} {r.dtype:9s} {r.case:20s} {r.config:38s} {r.regs:4d} "
                     f"{r.spill_stores:5d}/{r.spill_loads:<5d} {r.shared:7d} {verdict}")
    return "\n".join(lines)


def problems(results: list[Result], spill_free_dtypes=("bfloat16", "float16"), spill_free_archs=(90,)) -> list[str]:
    """Compile errors, configurations that cannot fit, and spills where none are allowed (reduced precision on
    sm_90)."""
    out = []
    for r in results:
        where = f"{r.kernel} sm_{r.arch} {r.dtype} {r.case} [{r.config}]"
        if r.error:
            out.append(f"{where}: {r.error}")
        elif not r.fits:
            out.append(f"{where}: needs {r.shared} B of shared memory, sm_{r.arch} allows "
                       f"{SHARED_LIMIT.get(r.arch, min(SHARED_LIMIT.values()))}")
        elif r.estimate is not None and r.estimate < r.shared:
            out.append(f"{where}: the pruning estimate ({r.estimate} B) is below the compiler's {r.shared} B of shared "
                       "memory, so a configuration that cannot fit could be kept")
        elif r.spill_stores and r.dtype in spill_free_dtypes and r.arch in spill_free_archs:
            out.append(f"{where}: spills {r.spill_stores} B of registers ({r.regs} registers)")
    return out


# -- CUDA kernels ---------------------------------------------------------------------------------------------------

_RES_FUNC = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = sm_(\d+)")


def cuda_resources(library: str | None = None) -> list[dict]:
    """Per CUDA kernel and architecture in the built extension: registers, stack, static shared and local memory."""
    if library is None:
        from . import _ext

        library = _ext.kernels().__file__
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", library], capture_output=True, text=True, check=True)
    rows, arch = [], None
    chunks = re.split(r"(?=Fatbin elf code:)", out.stdout)
    for chunk in chunks:
        m = _ARCH.search(chunk)
        arch = int(m.group(1)) if m else arch
        for f in _RES_FUNC.finditer(chunk):
            rows.append({"kernel": _demangle(f.group(1)), "arch": arch, "regs": int(f.group(2)),
                         "stack": int(f.group(3)), "shared": int(f.group(4)), "local": int(f.group(5))})
    return rows


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if filt is None:
        return name
    return subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name


def format_cuda(rows: list[dict]) -> str:
    lines = [f"{'CUDA kernel':90s} {'arch':5s} {'regs':>4s} {'stack':>5s} {'local':>5s} {'smem':>6s}"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        lines.append(f"{name:90s} sm_{r['arch']:<2d} {r['regs']:4d} {r['stack']:5d} {r['local']:5d} {r['shared']:6d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spa_kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--representative", action="store_true", help="one configuration per kernel, dtype and arch")
    p.add_argument("--cuda", action="store_true", help="report the built CUDA kernels' resources instead")
    a = p.parse_args(argv)
    if a.cuda:
        print(format_cuda(cuda_resources()))
        return 0
    results = check(tuple(int(x) for x in a.arch.split(",")), tuple(getattr(torch, d) for d in a.dtypes.split(",")),
                    representative=a.representative, progress=lambda r: print(".", end="", flush=True, file=sys.stderr))
    print(file=sys.stderr)
    print(format_results(results))
    bad = problems(results)
    spills = sum(1 for r in results if r.spill_stores)
    print(f"\n{len(results)} compiled configurations, {spills} with register spills, {len(bad)} problem(s)")
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
