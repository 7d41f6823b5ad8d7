"""impl="auto" on CUDA tensors: the measured cuda/triton table (spa_kernels/autotune.py), on the CPU with the timing
function, the GPU name, the usability check and free memory replaced."""

import json
import os

import pytest
import torch

from spa_kernels import _dispatch, autotune

GPU = torch.device("cuda", 0)
FREE = 8 * 2**30


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """autotune with a fake GPU: times come from `ms[(op, impl)]`, every call is recorded in `calls`."""
    monkeypatch.setenv("SPA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPA_KERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "gpu_name", lambda index: "NVIDIA Fake GPU 80GB")
    monkeypatch.setattr(autotune, "_free_bytes", lambda device: FREE)
    monkeypatch.setattr(autotune, "_candidates", lambda op, tensors=None, spec=None: autotune.CANDIDATES)
    state = {"ms": {}, "calls": [], "fail": False}

    def fake_time(op, impl, spec, device):
        state["calls"].append((op, impl, dict(spec)))
        if state["fail"]:
            raise RuntimeError("out of memory")
        return state["ms"][(op, impl)]

    monkeypatch.setattr(autotune, "_time_impl", fake_time)
    autotune.clear_cache()
    yield state
    autotune.clear_cache()


def _logits(V=1000, dtype=torch.bfloat16):
    return {"logits": torch.empty(2, 3, V, dtype=dtype), "labels": torch.zeros(2, 3, dtype=torch.long)}


def test_lazy_measurement_orders_by_time_and_is_cached_on_disk(tuner):
    tuner["ms"] = {("logprobs", "cuda"): 1.0, ("logprobs", "triton"): 2.0}
    assert autotune.order_for("logprobs", GPU, _logits()) == ("cuda", "triton")
    assert [c[:2] for c in tuner["calls"]] == [("logprobs", "cuda"), ("logprobs", "triton")]
    spec = tuner["calls"][0][2]
    assert spec["V"] == 1000 and spec["dtype"] == "bfloat16" and autotune.MIN_TOKENS <= spec["tokens"] <= 4096
    # written to the per-GPU file, read back without measuring again (also by a fresh process: cleared cache)
    path = autotune.table_path("NVIDIA Fake GPU 80GB")
    assert os.path.dirname(path) == os.environ["SPA_KERNELS_CACHE_DIR"] and "nvidia-fake-gpu-80gb" in path
    entry = json.load(open(path))["entries"]["logprobs|bfloat16|V<=1024"]
    assert entry["order"] == ["cuda", "triton"] and entry["ms"] == {"cuda": 1.0, "triton": 2.0}
    autotune.clear_cache()
    tuner["ms"] = {("logprobs", "cuda"): 9.0, ("logprobs", "triton"): 1.0}  # would flip it if re-measured
    assert autotune.order_for("logprobs", GPU, _logits(V=600)) == ("cuda", "triton")  # same bucket V <= 1024
    assert len(tuner["calls"]) == 2


def test_entries_are_per_op_dtype_and_vocabulary_bucket(tuner):
    tuner["ms"] = {("logprobs", "cuda"): 3.0, ("logprobs", "triton"): 2.0,
                   ("spa_logprobs", "cuda"): 1.0, ("spa_logprobs", "triton"): 2.0}
    assert autotune.order_for("logprobs", GPU, _logits(V=32000)) == ("triton", "cuda")
    spa = {**_logits(V=32000), "ref_logits": torch.empty(2, 3, 32000, dtype=torch.bfloat16)}
    assert autotune.order_for("spa_logprobs", GPU, spa) == ("cuda", "triton")
    autotune.order_for("logprobs", GPU, _logits(V=32000, dtype=torch.float32))
    autotune.order_for("logprobs", GPU, _logits(V=128256))
    keys = set(json.load(open(autotune.table_path("NVIDIA Fake GPU 80GB")))["entries"])
    assert keys == {"logprobs|bfloat16|V<=32768", "spa_logprobs|bfloat16|V<=32768", "logprobs|float32|V<=32768",
                    "logprobs|bfloat16|V<=131072"}


def test_dispatch_auto_order_puts_the_measured_winner_first(tuner):
    tuner["ms"] = {("logprobs", "cuda"): 1.0, ("logprobs", "triton"): 5.0}
    assert _dispatch.auto_order("logprobs", GPU, _logits()) == ("cuda", "triton", "torch")
    tuner["ms"] = {("linear_logprobs", "cuda"): 5.0, ("linear_logprobs", "triton"): 1.0}
    linear = {"hidden": torch.empty(1, 4, 64, dtype=torch.bfloat16), "weight": torch.empty(1000, 64,
                                                                                          dtype=torch.bfloat16)}
    assert _dispatch.auto_order("linear_logprobs", GPU, linear) == ("triton", "cuda", "torch")
    assert tuner["calls"][-1][2]["H"] == 64
    # CPU tensors never consult the table
    assert _dispatch.auto_order("logprobs", torch.device("cpu"), _logits()) == _dispatch.AUTO_ORDER_CPU


def test_autotune_off_or_failed_falls_back_to_the_static_order(tuner, monkeypatch):
    monkeypatch.setenv("SPA_KERNELS_AUTOTUNE", "0")
    assert autotune.order_for("logprobs", GPU, _logits()) is None
    assert _dispatch.auto_order("logprobs", GPU, _logits()) == _dispatch.AUTO_ORDER_CUDA_DEFAULT
    assert tuner["calls"] == []
    monkeypatch.delenv("SPA_KERNELS_AUTOTUNE")
    tuner["fail"] = True
    with pytest.warns(RuntimeWarning, match="could not measure logprobs"):
        assert autotune.order_for("logprobs", GPU, _logits()) is None
    n = len(tuner["calls"])
    assert autotune.order_for("logprobs", GPU, _logits()) is None  # not retried in this process
    assert len(tuner["calls"]) == n
    assert not os.path.exists(autotune.table_path("NVIDIA Fake GPU 80GB"))


def test_one_usable_candidate_needs_no_measurement(tuner, monkeypatch):
    monkeypatch.setattr(autotune, "_candidates", lambda op, tensors=None, spec=None: ("cuda",))
    assert autotune.order_for("logprobs", GPU, _logits()) is None
    assert tuner["calls"] == []


def test_measurement_fits_in_free_memory(tuner, monkeypatch):
    tuner["ms"] = {("logprobs", "cuda"): 1.0, ("logprobs", "triton"): 2.0}
    monkeypatch.setattr(autotune, "_free_bytes", lambda device: 2 * 2**30)
    autotune.order_for("logprobs", GPU, _logits(V=128256))
    spec = tuner["calls"][0][2]
    assert 3 * spec["tokens"] * 128256 * 2 <= 2 * 2**30 * autotune.LAZY_FREE_FRACTION < 3 * 4096 * 128256 * 2
    autotune.clear_cache()
    monkeypatch.setattr(autotune, "_free_bytes", lambda device: 2**20)  # nothing fits: no measurement, no error
    assert autotune.order_for("logprobs", GPU, _logits(V=128256, dtype=torch.float32)) is None


def test_tune_command_writes_every_entry(tuner, capsys):
    tuner["ms"] = {(op, impl): (1.0 if impl == "cuda" else 2.0) + i for i, op in enumerate(autotune.OPS)
                   for impl in autotune.CANDIDATES}
    entries = autotune.tune(dtypes=("bfloat16",), vocabs=(32000, 128256), hidden=256, tokens=512, device=GPU)
    assert len(entries) == len(autotune.OPS) * 2
    assert all(e["order"] == ["cuda", "triton"] and e["source"] == "command" for e in entries.values())
    assert all(c[2]["tokens"] == 512 for c in tuner["calls"])
    table = json.load(open(autotune.table_path("NVIDIA Fake GPU 80GB")))
    assert set(table["entries"]) == set(entries) and table["device"] == "NVIDIA Fake GPU 80GB"
    assert table["versions"]["torch"] == torch.__version__


def test_command_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert autotune.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def test_unreadable_table_is_ignored_with_a_warning(tuner):
    path = autotune.table_path("NVIDIA Fake GPU 80GB")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write("{not json")
    tuner["ms"] = {("logprobs", "cuda"): 2.0, ("logprobs", "triton"): 1.0}
    with pytest.warns(RuntimeWarning, match="unreadable autotune table"):
        assert autotune.order_for("logprobs", GPU, _logits()) == ("triton", "cuda")
    assert json.load(open(path))["entries"]["logprobs|bfloat16|V<=1024"]["order"] == ["triton", "cuda"]
