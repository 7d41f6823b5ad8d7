"""Built-in task `add`: add two numbers, judged by place-value accuracy.

    user:      add: 385+7
    assistant: 392

The oracle gives partial credit per place value: the response's digits and the sum's are aligned at the ones
place, and the score is the fraction of places (out of the longer number) whose digits agree; a response that is not
a number scores 0. A carry error costs one place, a dropped or an extra digit shifts every place and costs most of
the credit. Unlike reversal, the answer is computed (carries), and its length is fixed by the numbers.

Demonstrators: 45% careful; the rest forget carries, are off by one, drop the last digit, or append a digit.
"""

from __future__ import annotations

import random

from .base import Demonstrator, Task
from .chartok import CHARS

INSTRUCTION = "add: "
MAX_A, MAX_B = 999, 9


def operands(x: str) -> tuple[int, int]:
    a, b = x.split("+")
    return int(a), int(b)


def target(x: str) -> str:
    a, b = operands(x)
    return str(a + b)


def place_accuracy(response: str, answer: str) -> float:
    if not response.isdigit():
        return 0.0
    r, t = response[::-1], answer[::-1]
    return sum(a == b for a, b in zip(r, t)) / max(len(r), len(t))


def _no_carry(x: str, rng: random.Random) -> str:
    a, b = (s[::-1] for s in x.split("+"))
    digits = [(int(a[i]) if i < len(a) else 0) + (int(b[i]) if i < len(b) else 0) for i in range(max(len(a), len(b)))]
    return str(int("".join(str(d % 10) for d in reversed(digits))))


def _off_by_one(x: str, rng: random.Random) -> str:
    s = int(target(x))
    return str(s + 1 if s == 0 or rng.random() < 0.5 else s - 1)


def _hasty(x: str, rng: random.Random) -> str:
    t = target(x)
    return t[:-1] if len(t) > 1 else t + t


def _verbose(x: str, rng: random.Random) -> str:
    return target(x) + str(rng.randrange(10))


DEMONSTRATORS = (
    Demonstrator("careful", 0.45, "the exact sum", lambda x, rng: target(x)),
    Demonstrator("no_carry", 0.20, "adds digit by digit and forgets the carries", _no_carry),
    Demonstrator("off_by_one", 0.15, "the sum plus or minus one", _off_by_one),
    Demonstrator("hasty", 0.10, "the sum without its last digit", _hasty),
    Demonstrator("verbose", 0.10, "the sum followed by one stray digit", _verbose),
)


def _draw(rng: random.Random) -> str:
    return f"{rng.randint(0, MAX_A)}+{rng.randint(0, MAX_B)}"


TASK = Task(name="add", version="add-v3", instruction=INSTRUCTION, draw_input=_draw, target=target,
            score=lambda x, response: place_accuracy(response, target(x)), demonstrators=DEMONSTRATORS,
            alphabet=CHARS + "+", demo_overrides=("generate.max_new_tokens=10",))

build = TASK.build

ERROR_KINDS = ("exact", "shorter", "longer", "same_length", "not_a_number")


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: the fraction of place values whose digits agree with the sum's."""
    return TASK.oracle(prompt, response)


def error_kind(prompt: str, response: str) -> str:
    t, r = target(TASK.input_of(prompt)), response.strip()
    if not r.isdigit():
        return "not_a_number"
    if r == t:
        return "exact"
    return "shorter" if len(r) < len(t) else "longer" if len(r) > len(t) else "same_length"
