"""Shared test setup. Triton kernels run under the interpreter when there is no GPU: TRITON_INTERPRET must be set
before any @triton.jit function is defined, hence here, before the package is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import spa_kernels  # noqa: E402
from spa_kernels import _dispatch  # noqa: E402

KERNEL_IMPLS = ("torch", "cpu", "triton", "cuda")


def impl_device(impl: str) -> torch.device:
    """Where an implementation's tests run: GPU backends on the GPU when there is one."""
    if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def impl_params(op: str):
    """pytest params over every implementation, skipped (with the reason) where it cannot run here."""
    params = []
    for impl in KERNEL_IMPLS:
        reason = _dispatch.impl_unavailable_reason(impl)
        if reason is None:
            _, reason = _dispatch._backend_module(op, impl)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(impl, marks=marks, id=impl))
    return params


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


assert spa_kernels.available_impls() >= {"torch"}
