"""Deferred label checks (validate=False) on a multi-GPU host, without a GPU: torch.cuda is replaced by a recorder,
so what is checked is on which device and stream the flag's copy is queued and its event recorded."""

import contextlib
import types

import torch

from spa_kernels import _validation


class _Recorder:
    def __init__(self, current_device):
        self.current_device = current_device  # the caller's current device: not the flag's
        self.active_stream = None
        self.log = []

    # the parts of torch.cuda that _DeferredLabelChecks.push uses
    @contextlib.contextmanager
    def device(self, dev):
        prev, self.current_device = self.current_device, torch.device(dev).index
        try:
            yield
        finally:
            self.current_device = prev

    def current_stream(self, dev=None):
        index = self.current_device if dev is None else torch.device(dev).index
        return f"stream@cuda:{index}"

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.active_stream = self.active_stream, s
        try:
            yield
        finally:
            self.active_stream = prev

    def Event(self):  # noqa: N802 - mirrors torch.cuda.Event
        rec = self

        class _Event:
            def record(self, stream=None):
                rec.log.append(("record", stream if stream is not None else rec.current_stream()))

            def query(self):
                return True

            def synchronize(self):
                pass

        return _Event()


class _Host:
    def __init__(self, rec):
        self.rec, self.value = rec, None

    def copy_(self, src, non_blocking=False):
        # as torch: a device-to-host copy runs on the current stream of the source's device
        own = f"stream@cuda:{src.device.index}"
        stream = self.rec.active_stream if self.rec.active_stream == own else own
        self.rec.log.append(("copy", stream))
        self.value = int(src.value)

    def __getitem__(self, i):
        return self.value


def test_deferred_flag_copy_and_event_share_the_flag_devices_stream(monkeypatch):
    rec = _Recorder(current_device=0)
    fake_torch = types.SimpleNamespace(cuda=rec, empty=lambda *a, **k: _Host(rec), int64=torch.int64,
                                       device=torch.device)
    monkeypatch.setattr(_validation, "torch", fake_torch)
    flag = types.SimpleNamespace(device=torch.device("cuda", 1), value=_validation.NO_BAD_LABEL)
    checks = _validation._DeferredLabelChecks()
    checks.push(flag, torch.zeros(1, 1, dtype=torch.long), 10, -100, "labels")
    assert rec.log == [("copy", "stream@cuda:1"), ("record", "stream@cuda:1")], rec.log
    assert rec.current_device == 0  # the caller's current device is restored
    checks.raise_ready(wait=True)  # nothing bad: no error, the check is dropped
    assert len(checks) == 0
