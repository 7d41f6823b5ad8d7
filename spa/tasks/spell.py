"""Built-in task `spell`: write a number out in words (a long, word-structured answer).

    user:      spell: 2347
    assistant: two thousand three hundred forty seven

The oracle works on words: 1 - word-level edit distance to the correct spelling / the longer word count, in
[0, 1]. A wrong word costs one part in the answer's length (3-4 words), a structural error (reading the digits
one by one, leaving out "hundred") costs more. Unlike the other built-in tasks the answer is long (up to 27
characters, 6 words) and made of whole words, and the demonstrators' errors are systematic (a rule misapplied)
rather than slips of a letter or a digit.

Demonstrators: 40% careful; the rest read the digits one by one, leave out "hundred", use the neighbouring tens
word ("thirty" for "forty"), or insert a British "and" after "hundred".
"""

from __future__ import annotations

import random

from .base import Demonstrator, Task
from .chartok import CHARS

INSTRUCTION = "spell: "
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def words(n: int, tens_shift: int = 0, hundred: bool = True, british: bool = False) -> list[str]:
    """n (0-9999) in words; tens_shift moves the tens word (e.g. +1: forty -> fifty) where there is one;
    hundred=False leaves out "hundred", british=True puts "and" after it."""
    th, n = divmod(n, 1000)
    h, rest = divmod(n, 100)
    out = [ONES[th], "thousand"] if th else []
    if h:
        out += [ONES[h]] + (["hundred"] if hundred else [])
    if h and rest and british:
        out.append("and")
    if rest >= 20:
        t, o = divmod(rest, 10)
        out.append(TENS[min(9, max(2, t + tens_shift))])
        if o:
            out.append(ONES[o])
    elif rest >= 10:
        out.append(TEENS[rest - 10])
    elif rest or not out:
        out.append(ONES[rest])
    return out


def target(x: str) -> str:
    return " ".join(words(int(x)))


def word_similarity(response: str, answer: str) -> float:
    """1 - word-level Levenshtein distance / the longer word count."""
    a, b = response.split(), answer.split()
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b), 1)


def _digits(x: str, rng: random.Random) -> str:
    return " ".join(ONES[int(d)] for d in x)


def _tens_slip(x: str, rng: random.Random) -> str:
    n = int(x)
    t = n % 100 // 10
    if t >= 2:
        return " ".join(words(n, tens_shift=-1 if t == 9 else 1 if t == 2 else rng.choice((-1, 1))))
    return _digits(x, rng)


def _no_hundred(x: str, rng: random.Random) -> str:
    n = int(x)
    return " ".join(words(n, hundred=False)) if n % 1000 >= 100 else _tens_slip(x, rng)


def _british(x: str, rng: random.Random) -> str:
    n = int(x)
    return " ".join(words(n, british=True)) if n % 1000 >= 100 and n % 100 else _digits(x, rng)


DEMONSTRATORS = (
    Demonstrator("careful", 0.40, "the number in words", lambda x, rng: target(x)),
    Demonstrator("digits", 0.20, "reads the digits one by one (three four seven)", _digits),
    Demonstrator("no_hundred", 0.15, "leaves out 'hundred' (three forty seven)", _no_hundred),
    Demonstrator("tens_slip", 0.15, "the neighbouring tens word (three hundred thirty seven)", _tens_slip),
    Demonstrator("british", 0.10, "an 'and' after 'hundred' (three hundred and forty seven)", _british),
)


def _draw(rng: random.Random) -> str:
    return str(rng.randint(10, 9999))  # below 10 every demonstrator writes the same word


TASK = Task(name="spell", version="spell-v1", instruction=INSTRUCTION, draw_input=_draw, target=target,
            score=lambda x, response: word_similarity(response, target(x)), demonstrators=DEMONSTRATORS,
            alphabet=CHARS, demo_overrides=("generate.max_new_tokens=64", "train.max_length=96",
                                            "sft.max_length=96",
                                            "sft.from_scratch.max_position_embeddings=128"))

build = TASK.build

ERROR_KINDS = ("exact", "fewer_words", "more_words", "same_words")


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 1 - word edit distance to the number in words, normalised by the longer word count."""
    return TASK.oracle(prompt, response)


def error_kind(prompt: str, response: str) -> str:
    t, r = target(TASK.input_of(prompt)).split(), response.split()
    if r == t:
        return "exact"
    return "fewer_words" if len(r) < len(t) else "more_words" if len(r) > len(t) else "same_words"
