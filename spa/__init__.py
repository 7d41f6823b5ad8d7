"""spa: SPA (Spread Preference Annotation) — align an SFT model from a small gold seed and its own judgments.

    import spa
    cfg = spa.Config.load("config.yaml", overrides=["loop.iterations=2"])
    metrics = spa.run(cfg)            # resumable: rerun after an interruption continues where it stopped

Stages alone: spa.run_sft, spa.run_generate, spa.run_judge, spa.run_train, spa.run_validate, spa.run_eval (each
takes the config and an iteration). Judges: spa.judges; pair selection (REAL): spa.select; self-refinement:
spa.refine; held-out validation and the choice of the returned model: spa.validation; the built-in offline tasks
and `spa demo`: spa.tasks; plots: spa.plots. docs/trainer.md has the details.

The names below are imported on first use, so `import spa` (and `spa --help`) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"Config": "config", "ConfigError": "config", "DataError": "data", "run_eval": "stages.eval",
         "run_generate": "stages.generate", "run_judge": "stages.judge", "ConfigMismatch": "loop", "run": "loop",
         "run_sft": "stages.sft", "run_train": "stages.train", "run_validate": "stages.validate"}

__all__ = ["Config", "ConfigError", "ConfigMismatch", "DataError", "__version__", "run", "run_eval", "run_generate",
           "run_judge", "run_sft", "run_train", "run_validate"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spa' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
