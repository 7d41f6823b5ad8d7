"""Scorers for tests/spa/test_distributed.py, importable by every launched process (judge.function)."""

import os


def fails_on_rank_1(prompt: str, response: str) -> float:
    """A judge that works in a single process and on rank 0, and raises on rank 1 of a multi-process launch."""
    if os.environ.get("RANK") == "1":
        raise ValueError("judge broken on purpose on rank 1")
    return float(len(response))
