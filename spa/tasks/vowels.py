"""Built-in task `vowels`: how many vowels a word has (a one-character answer).

    user:      vowels: banana
    assistant: 3

The oracle scores the number: 1 - |answer - count| / 3 (at least 0), halved when the number is followed by other
text ("3 vowels"); an answer that does not start with a number scores 0. Off by one keeps 2/3 of the credit.
Unlike the other built-in tasks the answer is a single token, so a response's likelihood is one token's
probability and length says nothing about quality, except for the wordy demonstrator's.

Demonstrators: 40% careful; the rest are off by one, count each vowel once however often it occurs, count every
letter, or add the word "vowels" after the right number.
"""

from __future__ import annotations

import random
import re

from .base import Demonstrator, Task
from .chartok import CHARS

INSTRUCTION = "vowels: "
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = "aeiou"
MIN_LEN, MAX_LEN = 3, 9


def target(word: str) -> str:
    return str(sum(c in VOWELS for c in word))


def number_score(word: str, response: str) -> float:
    m = re.match(r"\d+", response)
    if not m:
        return 0.0
    credit = max(0.0, 1.0 - abs(int(m.group()) - int(target(word))) / 3)
    return credit if m.group() == response else credit / 2


def _off_by_one(word: str, rng: random.Random) -> str:
    k = int(target(word))
    return str(k + 1 if k == 0 or rng.random() < 0.5 else k - 1)


DEMONSTRATORS = (
    Demonstrator("careful", 0.40, "the number of vowels", lambda w, rng: target(w)),
    Demonstrator("off_by_one", 0.20, "the number of vowels plus or minus one", _off_by_one),
    Demonstrator("distinct", 0.15, "the number of different vowels", lambda w, rng: str(len(set(w) & set(VOWELS)))),
    Demonstrator("letters", 0.15, "the number of letters", lambda w, rng: str(len(w))),
    Demonstrator("wordy", 0.10, "the right number followed by the word 'vowels'", lambda w, rng: target(w) + " vowels"),
)


def _draw(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


TASK = Task(name="vowels", version="vowels-v1", instruction=INSTRUCTION, draw_input=_draw, target=target,
            score=number_score, demonstrators=DEMONSTRATORS, alphabet=CHARS,
            demo_overrides=("generate.max_new_tokens=12",))

build = TASK.build

ERROR_KINDS = ("exact", "wordy", "off", "not_a_number")


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 1 - |answer - vowel count| / 3, halved when other text follows the number."""
    return TASK.oracle(prompt, response)


def error_kind(prompt: str, response: str) -> str:
    t, r = target(TASK.input_of(prompt)), response.strip()
    if r == t:
        return "exact"
    if not re.match(r"\d+", r):
        return "not_a_number"
    return "wordy" if r.split()[0] == t else "off"
