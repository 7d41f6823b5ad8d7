"""spa: SPA (Spread Preference Annotation) — align an SFT model from a small gold seed and its own judgments.

    import spa
    cfg = spa.Config.load("config.yaml", overrides=["loop.iterations=2"])
    metrics = spa.run(cfg)            # resumable: rerun after an interruption continues where it stopped

Stages alone: spa.run_sft, spa.run_generate, spa.run_judge, spa.run_train, spa.run_validate, spa.run_eval (each
takes the config and an iteration). Judges: spa.judges; pair selection (REAL): spa.select; self-refinement:
spa.refine; held-out validation and the choice of the returned model: spa.validation; the built-in offline tasks
and `spa demo`: spa.tasks. docs/trainer.md has the details.
"""

from .config import Config, ConfigError
from .data import DataError
from .eval import run_eval
from .generate import run_generate
from .judges import run_judge
from .loop import ConfigMismatch, run
from .train import run_sft, run_train
from .validation import run_validate

__all__ = ["Config", "ConfigError", "ConfigMismatch", "DataError", "run", "run_eval", "run_generate", "run_judge",
           "run_sft", "run_train", "run_validate"]
