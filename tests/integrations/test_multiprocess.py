"""The drop-in trainers under `accelerate launch` with 2 CPU processes (gloo): after a few SGD steps the weights
equal those of a single process with the same global batch (2 x 2 pairs vs 1 x 4 pairs). The trainers are the
DRIVERS of tests/integrations/dist_train.py; adding a trainer there adds a case here."""

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
from tests.integrations.dist_train import DRIVERS, models  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_train.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")


def launch_two(driver, out, cwd):
    for attempt in range(2):  # the port is free when picked, but another process may take it first: retry once
        try:
            return run(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                        str(free_port()), SCRIPT, "--driver", driver, "--per-device-batch", "2", "--out", out], cwd)
        except pytest.fail.Exception as e:
            if attempt or "address already in use" not in str(e).lower():
                raise


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_two_processes_match_one(driver, tmp_path):
    if driver == "trl":
        pytest.importorskip("trl")
    two, one = str(tmp_path / "two.pt"), str(tmp_path / "one.pt")
    launch_two(driver, two, tmp_path)
    run([SCRIPT, "--driver", driver, "--per-device-batch", "4", "--out", one], tmp_path)
    two, one = torch.load(two), torch.load(one)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["distributed_type"].endswith("MULTI_CPU")
    losses = lambda run: [h["loss"] for h in run["log"] if "loss" in h]
    assert len(losses(two)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    start = models()[2].state_dict()
    moved = 0.0
    for name, w in one["state"].items():
        torch.testing.assert_close(two["state"][name], w, rtol=0, atol=2e-6, msg=name)
        moved = max(moved, (w - start[name]).abs().max().item())
    assert moved > 1e-2  # the runs did train: the agreement is not that of two untouched models
