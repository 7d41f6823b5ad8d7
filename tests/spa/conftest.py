"""Fixtures for the trainer tests: a small copy of the built-in task and a tiny from-scratch Llama.

Everything is generated offline (spa.tasks.reverse + the character tokenizer); the tiny model (1 layer, hidden 16)
is trained once per session by the real `sft` stage and reused by the stage tests.
"""

import os
import shutil

import pytest

from spa import Config
from spa.io import atomic_write_jsonl
from spa.tasks import reverse
from spa.tasks.chartok import char_tokenizer

TINY_MODEL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def task(tmp_path_factory) -> dict[str, str]:
    """A small version of the demo task on disk: sft / prefs / eval_prompts / eval_pairs JSONL + tokenizer."""
    root = tmp_path_factory.mktemp("task")
    paths = {}
    for name, rows in reverse.build(n_sft=96, n_prefs=120, n_eval_prompts=8, n_eval_pairs=8, seed=3).items():
        paths[name] = str(root / f"{name}.jsonl")
        atomic_write_jsonl(paths[name], rows)
    paths["tokenizer"] = str(root / "tokenizer")
    char_tokenizer().save_pretrained(paths["tokenizer"])
    return paths


def tiny_settings(task: dict[str, str], output_dir: str) -> dict:
    """The smallest complete config: SFT from scratch, seed DPO, 1 SPA iteration, evaluation; seconds per stage."""
    return {
        "output_dir": output_dir,
        "seed": 7,
        "model": {"tokenizer": task["tokenizer"], "device": "cpu"},
        "sft": {"enabled": True, "data": task["sft"], "from_scratch": dict(TINY_MODEL), "max_steps": 4,
                "learning_rate": 3e-3, "batch_size": 16, "max_length": 32},
        "data": {"seed": task["prefs"], "seed_size": 16, "iteration_prompts": [8, 8], "max_prompt_length": 24},
        "generate": {"max_new_tokens": 8, "batch_size": 4, "shard_size": 4},
        "judge": {"batch_size": 8},
        "train": {"learning_rate": 1e-3, "seed_epochs": 1, "batch_size": 4, "max_length": 32, "save_steps": 2,
                  "logging_steps": 1},
        "loop": {"iterations": 1},
        "eval": {"oracle": "spa.tasks.reverse:oracle", "prompts": task["eval_prompts"], "pairs": task["eval_pairs"],
                 "max_prompts": 8, "max_new_tokens": 8},
    }


@pytest.fixture
def tiny_cfg(task, tmp_path) -> Config:
    return Config.from_dict(tiny_settings(task, str(tmp_path / "run")))


@pytest.fixture(scope="session")
def sft_run(task, tmp_path_factory) -> str:
    """A run directory whose `sft` stage is done (the tiny model pi_init in <run>/sft/model); copy before writing."""
    from spa import run_sft

    out = str(tmp_path_factory.mktemp("sft_run") / "run")
    run_sft(Config.from_dict(tiny_settings(task, out)))
    return out


@pytest.fixture
def run_with_sft(sft_run, tiny_cfg) -> Config:
    """tiny_cfg whose output_dir already holds the SFT model (a private copy)."""
    shutil.copytree(os.path.join(sft_run, "sft"), os.path.join(tiny_cfg.output_dir, "sft"))
    return tiny_cfg
