"""Built-in task `count`: count the letters of a word, answered as a sorted list of letter-count items (a structured
answer).

    user:      count: cabbage
    assistant: a2 b2 c1 e1 g1

The oracle scores the items: the number of the answer's items that are in the correct list (each at most once)
over the larger of the two list lengths, times 0.9, plus 0.1 when the items are in alphabetical order. A wrong
count or a missing item costs one part in the list's length; items out of order keep 0.9 of the credit; letters
without counts score (almost) nothing. Unlike the other built-in tasks the answer has a format of its own (a list
of key-value items whose order matters), and a demonstrator can be right in content and wrong in form.

Demonstrators: 40% careful; the rest miscount one letter, leave out the last item, list the items in the order
the letters first appear, or write the letters without their counts.
"""

from __future__ import annotations

import random
from collections import Counter

from .base import Demonstrator, Task
from .chartok import CHARS

INSTRUCTION = "count: "
LETTERS = "abcdefg"
MIN_LEN, MAX_LEN = 4, 8


def items(word: str) -> list[str]:
    return [f"{c}{k}" for c, k in sorted(Counter(word).items())]


def target(word: str) -> str:
    return " ".join(items(word))


def item_score(word: str, response: str) -> float:
    pieces, want = response.split(), Counter(items(word))
    if not pieces:
        return 0.0
    matched = sum((Counter(pieces) & want).values())
    ordered = pieces == sorted(pieces, key=lambda p: (p[:1], p[1:]))
    return 0.9 * matched / max(len(pieces), sum(want.values())) + 0.1 * ordered


def _miscount(word: str, rng: random.Random) -> str:
    its = items(word)
    i = rng.randrange(len(its))
    k = int(its[i][1:])
    its[i] = its[i][0] + str(k + 1 if k == 1 or rng.random() < 0.5 else k - 1)
    return " ".join(its)


def _first_seen(word: str, rng: random.Random) -> str:
    counts = Counter(word)
    return " ".join(f"{c}{counts[c]}" for c in dict.fromkeys(word))


DEMONSTRATORS = (
    Demonstrator("careful", 0.40, "every letter with its count, in alphabetical order", lambda w, rng: target(w)),
    Demonstrator("miscount", 0.20, "one letter's count off by one", _miscount),
    Demonstrator("missing", 0.15, "the list without its last item (one item: all of it)",
                 lambda w, rng: " ".join(items(w)[:-1]) or target(w)),
    Demonstrator("first_seen", 0.15, "the items in the order the letters first appear", _first_seen),
    Demonstrator("bare", 0.10, "the letters without their counts", lambda w, rng: " ".join(sorted(set(w)))),
)


def _draw(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


TASK = Task(name="count", version="count-v1", instruction=INSTRUCTION, draw_input=_draw, target=target,
            score=item_score, demonstrators=DEMONSTRATORS, alphabet=CHARS,
            demo_overrides=("generate.max_new_tokens=32", "train.max_length=64", "sft.max_length=64"))

build = TASK.build

ERROR_KINDS = ("exact", "fewer_items", "more_items", "same_items")


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 0.9 x the correct items over the longer list, + 0.1 for alphabetical order."""
    return TASK.oracle(prompt, response)


def error_kind(prompt: str, response: str) -> str:
    t, r = target(TASK.input_of(prompt)).split(), response.split()
    if r == t:
        return "exact"
    return "fewer_items" if len(r) < len(t) else "more_items" if len(r) > len(t) else "same_items"
