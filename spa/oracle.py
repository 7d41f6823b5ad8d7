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
    except Exception as e:  # the module itself fails: a SyntaxError (its message names file and line), a NameError
        raise ValueError(f"{key} {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        import difflib

        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, names, n=1)
        raise ValueError(f"{key} {spec!r}: {module_name} has no callable {attr!r}"
                         + (f" (did you mean {module_name}:{close[0]}?)" if close else ""))
    return CheckedScorer(fn, key, spec)


class OracleError(ValueError):
    """A scorer raised, or returned something that is not a number (or NaN): names the key, prompt and response."""


class CheckedScorer:
    """fn(prompt, response) as a float: an exception inside fn is re-raised as OracleError naming the config key,
    the prompt and the response (the original traceback chained); a result that is not a real number, or NaN (which
    would make every comparison false and the win rates silently wrong), is an OracleError too."""

    def __init__(self, fn: Callable[[str, str], float], key: str, spec: str):
        self.fn, self.key, self.spec = fn, key, spec

    def __call__(self, prompt: str, response: str) -> float:
        where = f"on prompt {prompt[:60]!r}, response {response[:60]!r}"
        try:
            value = self.fn(prompt, response)
        except Exception as e:
            raise OracleError(f"{self.key} {self.spec!r} raised {type(e).__name__}: {e} ({where})") from e
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise OracleError(f"{self.key} {self.spec!r} returned {value!r}, not a number ({where})") from None
        if score != score:
            raise OracleError(f"{self.key} {self.spec!r} returned NaN ({where})")
        return score


def pairwise_win(a: float, b: float) -> float:
    """1 if a beats b, 1/2 on a tie, else 0."""
    return 1.0 if a > b else 0.5 if a == b else 0.0
