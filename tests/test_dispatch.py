"""Implementation choice: auto order, SPA_KERNELS_IMPL, clear errors for unusable implementations."""

import pytest
import torch

import spa_kernels as sk
from spa_kernels import _dispatch


def _inputs():
    return torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))


def test_available_impls_always_has_torch():
    impls = sk.available_impls()
    assert "torch" in impls and impls <= set(_dispatch.IMPLS)


def test_auto_on_cpu_prefers_the_cpu_kernels(monkeypatch):
    monkeypatch.delenv("SPA_KERNELS_IMPL", raising=False)
    logits, labels = _inputs()
    name, _ = _dispatch.resolve("logprobs", "auto", {"logits": logits, "labels": labels})
    assert name == ("cpu" if "cpu" in sk.available_impls() else "torch")
    # float64 is supported by cpu and torch alike; triton is never chosen automatically on the CPU
    name, _ = _dispatch.resolve("logprobs", "auto", {"logits": logits.double(), "labels": labels})
    assert name in ("cpu", "torch")


def test_env_var_replaces_auto_but_not_an_explicit_impl(monkeypatch):
    logits, labels = _inputs()
    monkeypatch.setenv("SPA_KERNELS_IMPL", "torch")
    assert _dispatch.resolve("logprobs", "auto", {"logits": logits, "labels": labels})[0] == "torch"
    if "cpu" in sk.available_impls():
        assert _dispatch.resolve("logprobs", "cpu", {"logits": logits, "labels": labels})[0] == "cpu"
    monkeypatch.setenv("SPA_KERNELS_IMPL", "bogus")
    with pytest.raises(ValueError, match="SPA_KERNELS_IMPL='bogus' is not one of"):
        sk.sequence_logprobs(logits, labels)


def test_unusable_impl_raises_with_reason_and_alternatives():
    logits, labels = _inputs()
    if "cuda" in sk.available_impls():
        pytest.skip("CUDA is usable here")
    with pytest.raises(ValueError, match=r"impl='cuda' cannot run logprobs here: .*Usable for these inputs: torch"):
        sk.sequence_logprobs(logits, labels, impl="cuda")


def test_results_agree_across_impls(monkeypatch):
    logits, labels = _inputs()
    outs = {impl: sk.sequence_logprobs(logits, labels, impl=impl) for impl in sk.available_impls()
            if _dispatch.unusable_reason("logprobs", impl, {"logits": logits, "labels": labels}) is None}
    base = outs.pop("torch")
    for impl, out in outs.items():
        torch.testing.assert_close(out, base, msg=impl)
