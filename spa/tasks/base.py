"""What every built-in task shares: prompts with one input, a mixed pool of demonstrators, and gold pairs built
the way UltraFeedback was.

A task is a `Task`: an instruction ("reverse: ", "add: ", ...), a way to draw an input, the correct answer, a
programmatic gold oracle with partial credit, and DEMONSTRATORS, annotators of mixed care (each demonstration
draws one), so that an SFT model imitating them has headroom. `Task.build` writes the same four files for every
task (sft demonstrations, gold preference pairs, held-out prompts and held-out gold pairs) as a pure function of
the task seed: the same rows on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Demonstrator:
    name: str
    probability: float
    description: str
    answer: Callable[[str, random.Random], str]  # (input, rng) -> the response this annotator writes


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(response: str, target: str) -> float:
    """1 - edit distance / the longer length, in [0, 1]."""
    return 1.0 - levenshtein(response, target) / max(len(response), len(target), 1)


@dataclass(frozen=True)
class Task:
    name: str
    version: str  # part of the demo's cache folder name: bump it when the rows change
    instruction: str  # the prompt is instruction + input
    draw_input: Callable[[random.Random], str]
    target: Callable[[str], str]
    score: Callable[[str, str], float]  # (input, stripped response) -> gold score in [0, 1]
    demonstrators: tuple[Demonstrator, ...]
    alphabet: str  # characters of the task's character-level tokenizer
    demo_overrides: tuple[str, ...] = ()  # config values the demo sets for this task (response lengths)

    def prompt(self, x: str) -> str:
        return self.instruction + x

    def input_of(self, prompt: str) -> str:
        """The input a prompt asks about (the text after the instruction)."""
        return prompt[len(self.instruction):] if prompt.startswith(self.instruction) else prompt.rsplit(" ", 1)[-1]

    def oracle(self, prompt: str, response: str) -> float:
        return self.score(self.input_of(prompt), response.strip())

    def demonstrate(self, x: str, rng: random.Random) -> str:
        """One annotator's answer: the annotator is drawn by DEMONSTRATORS' probabilities."""
        u, pick = rng.random(), self.demonstrators[-1]
        for d in self.demonstrators:
            if u < d.probability:
                pick = d
                break
            u -= d.probability
        return pick.answer(x, rng)

    def draw_inputs(self, n: int, rng: random.Random, taken: set[str]) -> list[str]:
        out = []
        while len(out) < n:
            x = self.draw_input(rng)
            if x not in taken:
                taken.add(x)
                out.append(x)
        return out

    def gold_pair(self, x: str, rng: random.Random, candidates: int = 4) -> dict:
        """UltraFeedback-style: `candidates` annotator responses, chosen = best by the oracle, rejected = a random
        strictly worse one (redrawn while all candidates tie)."""
        p = self.prompt(x)
        while True:
            resp = [self.demonstrate(x, rng) for _ in range(candidates)]
            scores = [self.oracle(p, r) for r in resp]
            best = max(range(candidates), key=lambda k: scores[k])
            worse = [k for k in range(candidates) if scores[k] < scores[best]]
            if worse:
                k = rng.choice(worse)
                return {"prompt": p,
                        "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": resp[best]}],
                        "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": resp[k]}],
                        "score_chosen": scores[best], "score_rejected": scores[k]}

    def build(self, n_sft: int = 4000, n_prefs: int = 3000, n_eval_prompts: int = 500, n_eval_pairs: int = 500,
              seed: int = 0) -> dict[str, list[dict]]:
        """The task's files as rows: sft (prompt/response demonstrations), prefs (gold pairs, UltraFeedback-binarized
        layout), eval_prompts, eval_pairs. All inputs are distinct across the files."""
        rng = random.Random(seed)
        taken: set[str] = set()
        sft_x, pref_x, ep_x, epair_x = (self.draw_inputs(n, rng, taken)
                                        for n in (n_sft, n_prefs, n_eval_prompts, n_eval_pairs))
        return {
            "sft": [{"prompt": self.prompt(x), "response": self.demonstrate(x, rng)} for x in sft_x],
            "prefs": [self.gold_pair(x, rng) for x in pref_x],
            "eval_prompts": [{"prompt": self.prompt(x)} for x in ep_x],
            "eval_pairs": [self.gold_pair(x, rng) for x in epair_x],
        }

    def exact_rate(self, rows) -> float:
        """Fraction of demonstration rows ({prompt, response}) that give the correct answer."""
        rows = list(rows)
        return sum(r["response"].strip() == self.target(self.input_of(r["prompt"])) for r in rows) / max(len(rows), 1)
