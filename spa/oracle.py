"""Programmatic scorers: any importable `module:function(prompt, response) -> float`, used as the gold oracle of
the evaluation (eval.oracle) or as a judge (judge.type: function, judge.function)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable


def _import(module_name: str):
    """importlib.import_module, also looking in the current working directory (as `python -m` and `python -c` do;
    the `spa` console script's sys.path does not hold it). The working directory comes after the installed
    packages, so it never shadows one."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        on_path = any(os.path.abspath(p or ".") == cwd for p in sys.path)
        if e.name != top or on_path or not (os.path.exists(os.path.join(cwd, top + ".py"))
                                             or os.path.isdir(os.path.join(cwd, top))):
            raise
    sys.path.append(cwd)
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def load_oracle(spec: str, key: str = "eval.oracle") -> Callable[[str, str], float]:
    """The function named by 'package.module:function' (importable, or a module in the current working directory);
    `prompt` is the last user message, `response` the text. `key` names the config key in error messages."""
    module_name, _, attr = spec.partition(":")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise ValueError(f"{key} {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def pairwise_win(a: float, b: float) -> float:
    """1 if a beats b, 1/2 on a tie, else 0."""
    return 1.0 if a > b else 0.5 if a == b else 0.0
