"""Builds the one compiled module, spa_kernels._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and
nvcc is found. Metadata lives in pyproject.toml. Install with `pip install --no-build-isolation -e .` so the
extension is compiled against the torch you run with.

Environment switches (flash-attn style):
  SPA_SKIP_CPU_BUILD=1     do not compile the C++ CPU kernels
  SPA_SKIP_CUDA_BUILD=1    do not compile the CUDA kernels
  SPA_CUDA_ARCHS="8.0;9.0" compute capabilities to build for (default 8.0;9.0; "+PTX" suffix allowed)
  SPA_CPU_CAPABILITY       DEFAULT | AVX2 | AVX512 (default AVX2 on x86-64, DEFAULT elsewhere); the package refuses
                           the CPU kernels at run time on a CPU without the instructions they were built for
  MAX_JOBS, NVCC_THREADS   parallel compile jobs (MAX_JOBS defaults to the cores, capped by free memory)
  CUDA_HOME                the CUDA toolkit (set it explicitly when `nvcc` on PATH is a wrapper script)

If an extension fails to build, the install still succeeds (the CUDA part is dropped first, then the CPU part)
and records why in spa_kernels/_build_status.json; `python -m spa_kernels.info` shows it.
"""

import glob
import json
import os
import platform
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = os.path.join(ROOT, "spa_kernels", "_build_status.json")
_status = {"attempted": [], "failed": {}, "skipped": {}}


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[spa_kernels setup] {msg}", file=sys.stderr, flush=True)


def _write_status(build_lib=None):
    """Into the source tree (editable installs) and, for wheels, into build_lib (build_py ran before build_ext)."""
    paths = [STATUS_FILE] + ([os.path.join(build_lib, "spa_kernels", "_build_status.json")] if build_lib else [])
    for path in paths:
        try:
            with open(path, "w") as f:
                json.dump(_status, f, indent=2)
        except OSError:
            pass


def _cpu_flags():
    cap = os.environ.get("SPA_CPU_CAPABILITY")
    if cap is None:
        cap = "AVX2" if platform.machine().lower() in ("x86_64", "amd64") else "DEFAULT"
    cap = cap.upper()
    isa = {"DEFAULT": [], "AVX2": ["-mavx2", "-mfma", "-mf16c"],
           "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}
    if cap not in isa:
        raise SystemExit(f"SPA_CPU_CAPABILITY must be one of {sorted(isa)}, got {cap!r}")
    # at::vec picks its implementation from CPU_CAPABILITY_<ISA>; ATen's parallel_for is OpenMP inline code.
    defines = [f"-DCPU_CAPABILITY={cap}"] + ([f"-DCPU_CAPABILITY_{cap}"] if cap != "DEFAULT" else [])
    # -ffp-contract=off: the kernels round x * scale once and reuse it in forward and backward (logprobs_cpu.h); an
    # FMA contracted in one place and not the other puts the product's rounding error into the gradient.
    return cap, ["-O3", "-fopenmp", "-ffp-contract=off"] + isa[cap] + defines


def _cuda_archs():
    archs = [a.strip() for a in os.environ.get("SPA_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return archs, flags


def _set_max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    jobs = os.cpu_count() or 1
    try:  # nvcc and template-heavy C++ take ~2 GB per job
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        jobs = max(1, min(jobs, int(free_gb // 2)))
    except (ValueError, OSError, AttributeError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


# Rough compile times on a few cores, for the notice printed before compiling (pip shows nothing meanwhile unless
# run with -v): the C++ CPU kernels take a minute or two; nvcc takes a few minutes per CUDA arch.
CPU_MINUTES = (1, 2)
CUDA_MINUTES_PER_ARCH = (2, 4)


def _compile_notice(parts) -> str:
    lo, hi = CPU_MINUTES if "cpu" in parts else (0, 0)
    what = ["the C++ CPU kernels"] if "cpu" in parts else []
    if "cuda" in parts:
        archs = _cuda_archs()[0]
        lo, hi = lo + CUDA_MINUTES_PER_ARCH[0] * len(archs), hi + CUDA_MINUTES_PER_ARCH[1] * len(archs)
        what.append(f"the CUDA kernels for {len(archs)} arch(s) ({';'.join(archs)}; SPA_CUDA_ARCHS picks them)")
    return (f"compiling {' and '.join(what)}: about {lo}-{hi} min with MAX_JOBS={os.environ.get('MAX_JOBS', '?')} "
            "(SPA_SKIP_CUDA_BUILD=1 / SPA_SKIP_CPU_BUILD=1 skip a part)")


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:
        _status["skipped"]["all"] = ("torch is not importable in the build environment; install torch first and "
                                     "use `pip install --no-build-isolation`")
        _log("torch not found: installing without compiled kernels (" + _status["skipped"]["all"] + ")")
        return []

    with_cpu = not _flag("SPA_SKIP_CPU_BUILD")
    with_cuda = not _flag("SPA_SKIP_CUDA_BUILD")
    if not with_cpu:
        _status["skipped"]["cpu"] = "SPA_SKIP_CPU_BUILD is set"
    if not with_cuda:
        _status["skipped"]["cuda"] = "SPA_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        with_cuda = False
        _status["skipped"]["cuda"] = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        with_cuda = False
        _status["skipped"]["cuda"] = f"nvcc not found (CUDA_HOME={CUDA_HOME}); set CUDA_HOME to the CUDA toolkit"
    if not (with_cpu or with_cuda):
        return []

    cap, cxx = _cpu_flags()
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/bindings.cpp"]
    defines = [f'-DSPA_TORCH_VERSION="{torch.__version__}"']
    if with_cpu:
        sources += rel("csrc/*/*_cpu.cpp")
        defines += ["-DSPA_WITH_CPU", f'-DSPA_CPU_CAPABILITY="{cap}"']
    _set_max_jobs()
    kwargs = dict(name="spa_kernels._C", include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        archs, gencode = _cuda_archs()
        cuda_defines = defines + ["-DSPA_WITH_CUDA", f'-DSPA_CUDA_ARCHS="{";".join(archs)}"',
                                  f'-DSPA_CUDA_VERSION="{torch.version.cuda}"']
        # -warn-spills: ptxas names any kernel that spills registers in the build log (python -m
        # spa_kernels.compile_check --cuda reports registers / local / shared memory of the built kernels)
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills",
                f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + gencode + cuda_defines
        ext = CUDAExtension(sources=sources + rel("csrc/*/*_cuda.cu"),
                            extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"], **kwargs)
        ext._spa_cpu_fallback = CppExtension(sources=sources, extra_compile_args={"cxx": cxx + defines},
                                             extra_link_args=["-fopenmp"], **kwargs) if with_cpu else None
        ext._spa_parts = ("cpu", "cuda") if with_cpu else ("cuda",)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx + defines},
                           extra_link_args=["-fopenmp"], **kwargs)
        ext._spa_cpu_fallback = None
        ext._spa_parts = ("cpu",)
    return [ext]


def _cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class TolerantBuildExtension(BuildExtension):
        """Never fails the install: drop CUDA, then drop the extension, recording why each time."""

        def build_extension(self, ext):
            parts = getattr(ext, "_spa_parts", ())
            _status["attempted"] = list(parts)
            _log(_compile_notice(parts))
            try:
                super().build_extension(ext)
                _status["built"] = list(parts)
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure must not fail the install
                err = "".join(traceback.format_exception_only(type(e), e)).strip()
                _log(f"building {'+'.join(parts)} kernels failed: {err}")
                _status["failed"]["+".join(parts)] = err[-2000:]
            fallback = getattr(ext, "_spa_cpu_fallback", None)
            if fallback is not None:
                _log("retrying with the CPU kernels only; " + _compile_notice(("cpu",)))
                try:
                    super().build_extension(fallback)
                    _status["built"] = ["cpu"]
                    return
                except Exception as e:  # noqa: BLE001
                    err = "".join(traceback.format_exception_only(type(e), e)).strip()
                    _status["failed"]["cpu"] = err[-2000:]
            _status["built"] = []
            self._spa_failed = getattr(self, "_spa_failed", set()) | {ext.name}
            _log("no compiled kernels: spa_kernels falls back to its PyTorch/Triton implementations. "
                 "See `python -m spa_kernels.info`.")

        # An extension that could not be built must not fail the steps that copy build outputs around.
        def _built_only(self, method, *args):
            failed = getattr(self, "_spa_failed", set())
            saved = self.extensions
            self.extensions = [e for e in saved if e.name not in failed]
            try:
                return method(self, *args)
            finally:
                self.extensions = saved

        def copy_extensions_to_source(self):
            return self._built_only(BuildExtension.copy_extensions_to_source)

        def get_outputs(self):
            return self._built_only(BuildExtension.get_outputs)

        def get_output_mapping(self):
            return self._built_only(BuildExtension.get_output_mapping)

        def run(self):
            try:
                super().run()
            finally:
                _write_status(None if self.inplace else self.build_lib)

    return {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


_exts = _extensions()
if not _exts:
    _write_status()
setup(ext_modules=_exts, cmdclass=_cmdclass() if _exts else {})
