"""Multi-process training on the CPU (gloo).

- The drop-in trainers under `accelerate launch` with 2 processes: after a few SGD steps the weights equal those of
  a single process with the same global batch (2 x 2 pairs vs 1 x 4 pairs), with DDP and, when deepspeed is
  importable, with DeepSpeed ZeRO-3 (examples/accelerate/zero3.yaml, DeepSpeed's CPU accelerator). The trainers
  are the DRIVERS of tests/integrations/dist_train.py; adding a trainer there adds cases here.
- The fused head inside an FSDP2-sharded model (tests/integrations/fsdp2_check.py under torchrun), and the `spa`
  trainer's loss training an FSDP2-sharded policy (tests/integrations/fsdp_spa_train.py).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
from tests.integrations.dist_train import DRIVERS, models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_train.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
# accelerate launch options per setup; the training script forces the CPU (TrainingArguments.use_cpu)
LAUNCHERS = {
    "ddp": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"],
    "zero3": ["--config_file", os.path.join(ROOT, "examples", "accelerate", "zero3.yaml")],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def with_free_port(args, cwd, port_flag):
    for attempt in range(2):  # the port is free when picked, but another process may take it first: retry once
        try:
            return run(args[:2] + [port_flag, str(free_port())] + args[2:], cwd)  # after "-m module"
        except pytest.fail.Exception as e:
            if attempt or "address already in use" not in str(e).lower():
                raise


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_two_processes_match_one(driver, launcher, tmp_path):
    if driver == "trl":
        pytest.importorskip("trl")
    if launcher == "zero3":
        pytest.importorskip("deepspeed")
    two, one = str(tmp_path / "two.pt"), str(tmp_path / "one.pt")
    with_free_port(["-m", "accelerate.commands.launch", *LAUNCHERS[launcher], SCRIPT, "--driver", driver,
                    "--per-device-batch", "2", "--out", two], tmp_path, "--main_process_port")
    run([SCRIPT, "--driver", driver, "--per-device-batch", "4", "--out", one], tmp_path)
    two, one = torch.load(two), torch.load(one)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["distributed_type"].endswith("DEEPSPEED" if launcher == "zero3" else "MULTI_CPU")
    losses = lambda run: [h["loss"] for h in run["log"] if "loss" in h]
    assert len(losses(two)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    start = models()[2].state_dict()
    moved = 0.0
    for name, w in one["state"].items():
        torch.testing.assert_close(two["state"][name], w, rtol=0, atol=2e-6, msg=name)
        moved = max(moved, (w - start[name]).abs().max().item())
    assert moved > 1e-2  # the runs did train: the agreement is not that of two untouched models


def test_fsdp2_sharded_model(tmp_path):
    out = with_free_port(["-m", "torch.distributed.run", "--nproc_per_node", "2",
                          os.path.join(HERE, "fsdp2_check.py")], tmp_path, "--master_port")
    for case in ("untied", "tied", "own_unit"):
        assert out.count(f"FSDP2 OK {case}") == 2, out[-3000:]


def test_fsdp2_spa_train_stage(tmp_path):
    """The spa trainer's loss (SPATrainer.compute_loss) on an FSDP2-sharded policy, 2 processes: same weights as the
    unsharded model on the whole batch after 3 SGD steps, for seed DPO and for SPA with DND."""
    out = with_free_port(["-m", "torch.distributed.run", "--nproc_per_node", "2",
                          os.path.join(HERE, "fsdp_spa_train.py")], tmp_path, "--master_port")
    for case in ("sigmoid", "spa-dnd"):
        assert out.count(f"FSDP SPA OK {case}") == 2, out[-3000:]
