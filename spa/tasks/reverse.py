"""Built-in task `reverse`: reverse a word, judged by a programmatic gold oracle with partial credit.

    user:      reverse: planet
    assistant: tenalp

Why this task. Preferences must be real and verifiable offline, so the quality of a response is a number a
program computes: oracle = 1 - Levenshtein(response, reversed word) / max(len(response), len(reversed word)), in
[0, 1]. Every way of being wrong (copying the word, a transposition, a dropped letter, padding) costs part of the
credit, so two responses are usually ordered, sometimes tied. Reversal is a classic sequence-to-sequence probe that
a tiny Llama learns on two CPU cores in about a minute, yet not perfectly, so sampled responses vary in quality.

The SFT demonstrations come, like human data, from annotators of mixed care (DEMONSTRATORS: 40% careful, the
rest lazy / sloppy / hasty / verbose), so the SFT model imitates some bad habits and has headroom. The preference
data is built the way UltraFeedback was (spa.tasks.base): four responses per prompt from the same annotator pool,
the oracle's best is "chosen" and a random strictly worse one "rejected" (score_chosen / score_rejected kept).
"""

from __future__ import annotations

import random

from .base import Demonstrator, Task, edit_similarity, levenshtein
from .chartok import CHARS

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
INSTRUCTION = "reverse: "
MIN_LEN, MAX_LEN = 3, 8


def target(word: str) -> str:
    return word[::-1]


def _swap_two(word: str, rng: random.Random) -> str:
    t = target(word)
    i = rng.randrange(len(t) - 1)
    return t[:i] + t[i + 1] + t[i] + t[i + 2:]


def _hasty(word: str, rng: random.Random) -> str:
    t = target(word)
    return t[:max(1, len(t) - rng.randint(1, 2))]


def _verbose(word: str, rng: random.Random) -> str:
    t = target(word)
    return t + t[-1] * rng.randint(1, 3)


DEMONSTRATORS = (
    Demonstrator("careful", 0.40, "the exact reversal", lambda w, rng: target(w)),
    Demonstrator("lazy", 0.20, "copies the word unchanged", lambda w, rng: w),
    Demonstrator("sloppy", 0.15, "the reversal with two neighbouring letters swapped", _swap_two),
    Demonstrator("hasty", 0.15, "the reversal without its last one or two letters", _hasty),
    Demonstrator("verbose", 0.10, "the reversal followed by one to three repeats of its last letter", _verbose),
)


def _draw_word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


TASK = Task(name="reverse", version="reverse-v1", instruction=INSTRUCTION, draw_input=_draw_word, target=target,
            score=lambda word, response: edit_similarity(response, target(word)), demonstrators=DEMONSTRATORS,
            alphabet=CHARS, demo_overrides=("generate.max_new_tokens=16",))

word_of = TASK.input_of
prompt_for = TASK.prompt
demonstrate = TASK.demonstrate
gold_pair = TASK.gold_pair
build = TASK.build


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 1 - edit distance to the reversed word, normalised by the longer length."""
    return TASK.oracle(prompt, response)


def make_words(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    return TASK.draw_inputs(n, rng, taken)


ERROR_KINDS = ("exact", "truncated", "padded", "copy", "same_length", "other")


def error_kind(prompt: str, response: str) -> str:
    """What a response did, for analysis: exact reversal, truncated (a proper prefix of it), padded (it plus extra
    characters), copy (the word unchanged), same_length (as long as the reversal, other letters) or other."""
    word = word_of(prompt)
    t, r = target(word), response.strip()
    if r == t:
        return "exact"
    if r == word:
        return "copy"
    if t.startswith(r):
        return "truncated"
    if r.startswith(t):
        return "padded"
    return "same_length" if len(r) == len(t) else "other"


__all__ = ["TASK", "oracle", "error_kind", "ERROR_KINDS", "target", "word_of", "levenshtein", "build"]
