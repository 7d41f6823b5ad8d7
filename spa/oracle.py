"""Programmatic scorers: any importable `module:function(prompt, response) -> float`, used as the gold oracle of
the evaluation (eval.oracle) or as a judge (judge.type: function, judge.function)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def load_oracle(spec: str, key: str = "eval.oracle") -> Callable[[str, str], float]:
    """The function named by 'package.module:function'; `prompt` is the last user message, `response` the text.
    `key` names the config key in error messages."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key} {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def pairwise_win(a: float, b: float) -> float:
    """1 if a beats b, 1/2 on a tie, else 0."""
    return 1.0 if a > b else 0.5 if a == b else 0.0
