"""The built-in task: reverse a word, judged by a programmatic gold oracle with partial credit.

    user:      reverse: planet
    assistant: tenalp

Why this task. Preferences must be real and verifiable offline, so the quality of a response is a number a
program computes: oracle = 1 - Levenshtein(response, reversed word) / max(len(response), len(reversed word)), in
[0, 1]. Every way of being wrong (copying the word, a transposition, a dropped letter, padding) costs part of the
credit, so two responses are usually ordered, sometimes tied. Reversal is a classic sequence-to-sequence probe that
a tiny Llama learns on two CPU cores in about a minute, yet not perfectly, so sampled responses vary in quality.

The SFT demonstrations come, like human data, from annotators of mixed care (DEMONSTRATORS: 40% careful, the
rest lazy / sloppy / hasty / verbose), so the SFT model imitates some bad habits and has headroom. The preference
data is built the way UltraFeedback was: four responses per prompt from the same annotator pool, the oracle's
best is "chosen" and a random strictly worse one "rejected" (score_chosen / score_rejected kept); the demo
labels 3.3% of these pairs (the SPA paper's seed fraction) and uses only the prompts of the rest.

Everything is a pure function of the task seed: the same files on every machine.
"""

from __future__ import annotations

import random

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
INSTRUCTION = "reverse: "
MIN_LEN, MAX_LEN = 3, 8

# (name, probability, how that annotator answers); each demonstration draws one annotator.
DEMONSTRATORS = (
    ("careful", 0.40, "the exact reversal"),
    ("lazy", 0.20, "copies the word unchanged"),
    ("sloppy", 0.15, "the reversal with two neighbouring letters swapped"),
    ("hasty", 0.15, "the reversal without its last one or two letters"),
    ("verbose", 0.10, "the reversal followed by one to three repeats of its last letter"),
)


def target(word: str) -> str:
    return word[::-1]


def word_of(prompt: str) -> str:
    """The word a prompt asks to reverse (the text after the instruction)."""
    return prompt[len(INSTRUCTION):] if prompt.startswith(INSTRUCTION) else prompt.rsplit(" ", 1)[-1]


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def oracle(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 1 - edit distance to the reversed word, normalised by the longer length."""
    t = target(word_of(prompt))
    response = response.strip()
    return 1.0 - levenshtein(response, t) / max(len(response), len(t), 1)


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


def demonstrate(word: str, rng: random.Random) -> str:
    """One annotator's answer (see DEMONSTRATORS)."""
    t = target(word)
    u, name = rng.random(), DEMONSTRATORS[-1][0]
    for n, p, _ in DEMONSTRATORS:
        if u < p:
            name = n
            break
        u -= p
    if name == "careful":
        return t
    if name == "lazy":
        return word
    if name == "sloppy":
        i = rng.randrange(len(t) - 1)
        return t[:i] + t[i + 1] + t[i] + t[i + 2:]
    if name == "hasty":
        return t[:max(1, len(t) - rng.randint(1, 2))]
    return t + t[-1] * rng.randint(1, 3)


def prompt_for(word: str) -> str:
    return INSTRUCTION + word


def make_words(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def gold_pair(word: str, rng: random.Random, candidates: int = 4) -> dict:
    """UltraFeedback-style: `candidates` annotator responses, chosen = best by the oracle, rejected = a random
    strictly worse one (redrawn while all candidates tie)."""
    p = prompt_for(word)
    while True:
        resp = [demonstrate(word, rng) for _ in range(candidates)]
        scores = [oracle(p, r) for r in resp]
        best = max(range(candidates), key=lambda k: scores[k])
        worse = [k for k in range(candidates) if scores[k] < scores[best]]
        if worse:
            k = rng.choice(worse)
            return {"prompt": p,
                    "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": resp[best]}],
                    "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": resp[k]}],
                    "score_chosen": scores[best], "score_rejected": scores[k]}


def build(n_sft: int = 4000, n_prefs: int = 3000, n_eval_prompts: int = 500, n_eval_pairs: int = 500,
          seed: int = 0) -> dict[str, list[dict]]:
    """The task's files as rows: sft (prompt/response demonstrations), prefs (gold pairs, UltraFeedback-binarized
    layout), eval_prompts, eval_pairs. All words are distinct across the files."""
    rng = random.Random(seed)
    taken: set[str] = set()
    sft_words, pref_words, ep_words, epair_words = (make_words(n, rng, taken)
                                                    for n in (n_sft, n_prefs, n_eval_prompts, n_eval_pairs))
    return {
        "sft": [{"prompt": prompt_for(w), "response": demonstrate(w, rng)} for w in sft_words],
        "prefs": [gold_pair(w, rng) for w in pref_words],
        "eval_prompts": [{"prompt": prompt_for(w)} for w in ep_words],
        "eval_pairs": [gold_pair(w, rng) for w in epair_words],
    }
