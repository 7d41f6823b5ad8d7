"""Builds the CPU emulation of the CUDA log-prob kernels (tests/cuda_emu/test_*.py use it).

The kernels' own source (csrc/logprobs/logprobs_cuda.cu, csrc/spa_logprobs/spa_logprobs_cuda.cu, up to the end of
their device code) is compiled as host C++ after cuda_emu.h, with the launchers of harness.cpp, into a throwaway
torch extension: the code under test is the shipped kernel code, unmodified.
"""

from __future__ import annotations

import hashlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = ["csrc/logprobs/logprobs_cuda.cu", "csrc/spa_logprobs/spa_logprobs_cuda.cu"]
HEADER = os.path.join(ROOT, "csrc", "logprobs", "logprobs_cuda.cuh")
DEVICE_CODE_END = "}  // namespace\n"  # closes each file's anonymous namespace of kernels


def cuda_include() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    inc = os.path.join(home, "include")
    return inc if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")) else None


def device_code(path: str) -> str:
    """The file's text up to the end of its kernels, with the shared header included by absolute path."""
    text = open(os.path.join(ROOT, path)).read()
    end = text.index(DEVICE_CODE_END) + len(DEVICE_CODE_END)
    text = re.sub(r'#include "[^"]*logprobs_cuda\.cuh"', f'#include "{HEADER}"', text[:end])
    return f"// ---- {path} (device code)\n#line 1 \"{path}\"\n{text}}}  // namespace spa\n"


def source() -> str:
    parts = [
        "#include <torch/extension.h>",
        "#include <c10/cuda/CUDAGuard.h>",
        "#include <c10/cuda/CUDAStream.h>",
        f'#include "{os.path.join(HERE, "cuda_emu.h")}"',
        *(device_code(p) for p in KERNELS),
        open(os.path.join(HERE, "harness.cpp")).read(),
    ]
    return "\n".join(parts)


def load(verbose: bool = False):
    """Compiles (cached by content hash under the torch extensions dir) and imports the emulation module."""
    from torch.utils.cpp_extension import load as load_ext

    src = source()
    deps = "".join(open(p).read() for p in (HEADER, os.path.join(HERE, "cuda_emu.h")))
    digest = hashlib.sha1((src + deps).encode()).hexdigest()[:12]
    build_dir = os.path.join(os.environ.get("SPA_EMU_BUILD_DIR", os.path.join(ROOT, "build", "cuda_emu")), digest)
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "cuda_emu.cpp")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(src)
    return load_ext(name=f"spa_cuda_emu_{digest}", sources=[path], build_directory=build_dir,
                    extra_include_paths=[os.path.join(ROOT, "csrc"), cuda_include()],
                    extra_cflags=["-O2", "-Wno-unused-variable", "-Wno-unused-function"], verbose=verbose)


if __name__ == "__main__":
    print(load(verbose=True))
