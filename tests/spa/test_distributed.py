"""`spa run` under `accelerate launch` with 2 CPU processes (gloo) against the same run in 1 process.

- The stages that split their shards between the processes (generate, judge, eval; validate on the main process)
  write byte-identical outputs, from the same trained models.
- The whole loop (sft, seed DPO, one SPA iteration with de-coupled noise detection, validation, eval) ends with the
  same weights (up to float summation order in the gradient all-reduce) and identical samples.
- A 2-process run killed inside the generate stage reuses the shards it finished and ends with the outputs of an
  uninterrupted 1-process run.
- A failure on one process stops every process with the error named, instead of leaving the other one waiting.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.spa.conftest import tiny_settings

pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# train.warmup_ratio=0: with a warm-up step at learning rate 0 the policy equals its reference at the second step, so
# every SPA margin is 0 up to float noise and the noisy-pair threshold would be decided by that noise (the same holds
# for every first step: the policy starts as its reference, hence refine.warmup_ratio > 0). refine: half of the
# pairs flagged noisy with a large label flip, so that a noise detector seeing only its own process's pairs changes
# the weights.
OVERRIDES = {"generate": {"shard_size": 2}, "train": {"warmup_ratio": 0.0},
             "refine": {"percentile": 50.0, "alpha": 0.4}}
STAGE_OUTPUTS = ["sft/eval.json", "sft/eval_samples.jsonl", "iter_0/validation.json", "iter_0/eval.json",
                 "iter_0/eval_samples.jsonl", "iter_1/samples.jsonl", "iter_1/pairs.jsonl"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spa(cwd, *args, processes=1, env=None, check=True, timeout=600):
    """`spa ARGS` in cwd, in one process or under accelerate launch (CPU, gloo); returns the CompletedProcess."""
    launch = [] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SPA_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   **(env or {}))
    proc = subprocess.run([sys.executable, *launch, "-m", "spa.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"spa {' '.join(args)} ({processes} processes) exited with {proc.returncode}:\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(folder, task, **sections) -> str:
    """config.yaml in folder, output_dir 'run' relative to it (so recorded model paths are the same in every run)."""
    settings = tiny_settings(task, "run")
    for name, values in {**OVERRIDES, **sections}.items():
        settings[name] = {**settings.get(name, {}), **values}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(settings, f)
    return "config.yaml"


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    """The whole loop, once in 1 process ("one") and once in 2 ("two")."""
    out = {}
    for name, processes in (("one", 1), ("two", 2)):
        folder = str(tmp_path_factory.mktemp(name))
        spa(folder, "run", write_config(folder, task), processes=processes)
        out[name] = os.path.join(folder, "run")
    return out


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def trained_start(one_run: str, folder: str, task, **sections) -> str:
    """A run folder holding the 1-process run's SFT and seed-DPO models (and nothing after them)."""
    config = write_config(folder, task, **sections)
    run = os.path.join(folder, "run")
    shutil.copytree(os.path.join(one_run, "sft"), os.path.join(run, "sft"),
                    ignore=shutil.ignore_patterns("eval*"))
    shutil.copytree(os.path.join(one_run, "iter_0", "model"), os.path.join(run, "iter_0", "model"))
    return config


def test_stage_outputs_are_byte_identical(runs, task, tmp_path):
    folder = str(tmp_path)
    config = trained_start(runs["one"], folder, task)
    spa(folder, "run", config, "--until", "iter_1/judge", processes=2)
    for name in STAGE_OUTPUTS:
        assert read(os.path.join(folder, "run", name)) == read(os.path.join(runs["one"], name)), name
    generated = json.loads(read(os.path.join(folder, "run", "iter_1", "generate_metrics.json")))
    assert generated["generate/shards_per_process"] == [2, 2]  # the 4 shards were split, not run twice
    assert not os.path.exists(os.path.join(folder, "run", ".partial", "iter_1"))


def test_whole_run_matches_one_process(runs):
    import torch
    from safetensors.torch import load_file

    one, two = runs["one"], runs["two"]
    for name in ("sft/eval_samples.jsonl", "iter_1/samples.jsonl"):
        assert read(os.path.join(two, name)) == read(os.path.join(one, name)), name
    pairs = lambda run: [(p["chosen"], p["rejected"]) for p in map(json.loads, open(os.path.join(run, "iter_1",
                                                                                               "pairs.jsonl")))]
    assert pairs(two) == pairs(one)
    start = load_file(os.path.join(one, "sft", "model", "model.safetensors"))
    for model in ("sft", "iter_0", "iter_1"):
        a = load_file(os.path.join(one, model, "model", "model.safetensors"))
        b = load_file(os.path.join(two, model, "model", "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=f"{model}: {key}")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the iterations did train: the agreement is not that of untouched models
    steps = lambda run: json.loads(read(os.path.join(run, "metrics.json")))["stages"]["iter_1/train"]["train/steps"]
    assert steps(two) == steps(one) == 2  # the same global batch: 8 pairs / 4 per step
    # the noise detector's threshold (logged per step) is the one of a single process on the global batch
    logged = lambda run: [e["refine/threshold"] for e in map(json.loads, open(os.path.join(
        run, "iter_1", "train_log.jsonl"))) if "refine/threshold" in e]
    assert len(logged(two)) == 2 and logged(two) == pytest.approx(logged(one), abs=1e-6)
    selected = lambda run: json.loads(read(os.path.join(run, "selected.json")))
    assert selected(two)["iteration"] == selected(one)["iteration"]
    assert selected(two)["values"] == pytest.approx(selected(one)["values"], abs=1e-5)


def test_killed_two_process_run_resumes_from_its_shards(runs, task, tmp_path):
    folder = str(tmp_path)
    config = trained_start(runs["one"], folder, task)
    crashed = spa(folder, "run", config, "--until", "iter_1/generate", processes=2, check=False,
                  env={"SPA_CRASH_AFTER": "generate:1"})
    assert crashed.returncode != 0
    partial = os.path.join(folder, "run", ".partial", "iter_1", "generate")
    kept = sorted(os.listdir(partial))
    assert kept and not os.path.exists(os.path.join(folder, "run", "iter_1", "samples.jsonl"))
    assert all(name.startswith("shard_") and name.endswith(".jsonl") for name in kept)  # no torn temporary files
    spa(folder, "run", config, "--until", "iter_1/generate", processes=2)
    name = "iter_1/samples.jsonl"
    assert read(os.path.join(folder, "run", name)) == read(os.path.join(runs["one"], name))
    generated = json.loads(read(os.path.join(folder, "run", "iter_1", "generate_metrics.json")))
    assert generated["generate/shards_computed"] == 4 - len(kept)


def test_failure_on_one_process_stops_both(runs, task, tmp_path):
    folder = str(tmp_path)
    config = trained_start(runs["one"], folder, task,
                           judge={"type": "function", "function": "tests.spa.dist_helpers:fails_on_rank_1"})
    t0 = time.perf_counter()
    proc = spa(folder, "run", config, "--until", "iter_1/judge", processes=2, check=False, timeout=300,
               env={"SPA_DIST_TIMEOUT_S": "120"})
    assert proc.returncode != 0 and time.perf_counter() - t0 < 100
    assert "judge broken on purpose on rank 1" in proc.stderr
    assert ("spa: error (process 0): judge shards: process 1 of 2 failed: OracleError: judge.function "
            "'tests.spa.dist_helpers:fails_on_rank_1' raised ValueError: judge broken") in proc.stderr
    assert not os.path.exists(os.path.join(folder, "run", "iter_1", "pairs.jsonl"))


def test_uneven_last_batch_is_named():
    from spa.trainer import uneven_last_batch

    assert uneven_last_batch(8, 4, 2) is None and uneven_last_batch(75, 8, 1) is None
    assert uneven_last_batch(75, 8, 2).startswith("75 pairs are not a multiple of train.batch_size 8: with 2 "
                                                  "processes, accelerate fills the last batch of each epoch with 5 "
                                                  "pairs from the epoch's start")


def test_noise_detector_sees_every_process_margins():
    """With several processes, every process flags the noisy pairs of the whole step (the gathered margins, in rank
    order), exactly as one process on the global batch would, and keeps its own rows."""
    from types import SimpleNamespace

    import torch

    from spa.refine import NoiseDetector
    from spa.trainer import SPATrainer

    margins = torch.tensor([0.9, 0.8, 0.7, 0.6, -0.5, -0.4, 0.3, 0.2])  # rank 1's rows hold the low margins
    world = 2
    want_noisy, want_threshold = NoiseDetector(percentile=25, window=50)(margins)
    assert want_noisy[4:].any() and not want_noisy[:4].any()
    for rank in range(world):
        accelerator = SimpleNamespace(num_processes=world, process_index=rank, gather=lambda t: margins.clone())
        trainer = SimpleNamespace(accelerator=accelerator, detector=NoiseDetector(percentile=25, window=50))
        noisy, threshold = SPATrainer._detect_noise(trainer, margins.chunk(world)[rank])
        assert threshold == want_threshold
        assert torch.equal(noisy, want_noisy.chunk(world)[rank])
