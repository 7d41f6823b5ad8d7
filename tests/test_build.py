"""The compiled extension: built, importable, and (where nvcc and a CUDA torch exist) compiled with CUDA for the
configured archs. The install tolerates build failures, so these tests are what makes CI catch them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from spa_kernels import _ext


def _cuda_toolkit():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "spa_kernels.info"], capture_output=True, text=True, check=True)
    assert "implementations:" in out.stdout and "torch" in out.stdout


@pytest.mark.skipif(os.environ.get("SPA_SKIP_CPU_BUILD") == "1", reason="CPU build skipped on purpose")
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_cpu_kernels_built():
    assert _ext.cpu_unavailable_reason() is None, _ext.cpu_unavailable_reason()


@pytest.mark.skipif(os.environ.get("SPA_SKIP_CUDA_BUILD") == "1", reason="CUDA build skipped on purpose")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch")
@pytest.mark.skipif(_cuda_toolkit() is None, reason="no CUDA toolkit (set CUDA_HOME)")
def test_cuda_kernels_compiled_for_configured_archs():
    info = _ext.build_info()
    assert info.get("cuda"), f"CUDA kernels not compiled: {_ext.build_status()}"
    want = os.environ.get("SPA_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";")
    assert info["cuda_archs"].split(";") == [a.strip() for a in want if a.strip()]
