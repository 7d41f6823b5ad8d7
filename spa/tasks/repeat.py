"""Built-in task `repeat`: write a word a given number of times (a counting and format-following task).

    user:      repeat 3: cat
    assistant: cat cat cat

The oracle counts: the response is split at spaces, and the score is the number of pieces that are the word (at
most the number asked for) divided by the larger of that number and the number of pieces. One copy too few or too
many, or one misspelt copy, costs one part in N; copies run together without spaces score 0. Here the correct
answer is often the longer one (stopping early is a typical error), the opposite of `reverse`'s padding errors.

Demonstrators: 40% careful; the rest write one copy too few or too many, misspell one copy, or omit the spaces.
"""

from __future__ import annotations

import random

from .base import Demonstrator, Task
from .chartok import CHARS

INSTRUCTION = "repeat "
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_N, MAX_N = 2, 4
MIN_LEN, MAX_LEN = 2, 4


def parse(x: str) -> tuple[int, str]:
    n, word = x.split(": ", 1)
    return int(n), word


def target(x: str) -> str:
    n, word = parse(x)
    return " ".join([word] * n)


def count_score(x: str, response: str) -> float:
    n, word = parse(x)
    pieces = response.split()
    if not pieces:
        return 0.0
    return min(n, sum(p == word for p in pieces)) / max(n, len(pieces))


def _copies(x: str, k: int) -> str:
    return " ".join([parse(x)[1]] * k)


def _typo(x: str, rng: random.Random) -> str:
    n, word = parse(x)
    copies = [word] * n
    i, j = rng.randrange(n), rng.randrange(len(word))
    copies[i] = word[:j] + rng.choice([c for c in LETTERS if c != word[j]]) + word[j + 1:]
    return " ".join(copies)


DEMONSTRATORS = (
    Demonstrator("careful", 0.40, "the word exactly N times", lambda x, rng: target(x)),
    Demonstrator("short", 0.20, "one copy too few", lambda x, rng: _copies(x, parse(x)[0] - 1)),
    Demonstrator("long", 0.15, "one copy too many", lambda x, rng: _copies(x, parse(x)[0] + 1)),
    Demonstrator("typo", 0.15, "N copies, one of them with a wrong letter", _typo),
    Demonstrator("joined", 0.10, "N copies without spaces", lambda x, rng: parse(x)[1] * parse(x)[0]),
)


def _draw(rng: random.Random) -> str:
    n = rng.randint(MIN_N, MAX_N)
    return f"{n}: " + "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


TASK = Task(name="repeat", version="repeat-v1", instruction=INSTRUCTION, draw_input=_draw, target=target,
            score=count_score, demonstrators=DEMONSTRATORS, alphabet=CHARS,
            demo_overrides=("generate.max_new_tokens=32", "train.max_length=64"))

build = TASK.build

ERROR_KINDS = ("exact", "fewer", "more", "same_count", "other")


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: correct copies (at most N) over max(N, pieces)."""
    return TASK.oracle(prompt, response)


def error_kind(prompt: str, response: str) -> str:
    x = TASK.input_of(prompt)
    n, _ = parse(x)
    r = response.strip()
    if r == target(x):
        return "exact"
    k = len(r.split())
    return "fewer" if k < n else "more" if k > n else "same_count"
