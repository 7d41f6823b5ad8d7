"""Built-in offline tasks, each with a programmatic gold oracle with partial credit:

  reverse   reverse a word ("reverse: planet" -> "tenalp"; edit-distance credit)
  add       add two numbers ("add: 385+47" -> "432"; place-value credit)
  repeat    write a word N times ("repeat 3: cat" -> "cat cat cat"; counting credit)
  spell     write a number in words ("spell: 2347" -> "two thousand three hundred forty seven"; word edit credit)
  count     count a word's letters ("count: cabbage" -> "a2 b2 c1 e1 g1"; item credit, order bonus)
  vowels    count a word's vowels ("vowels: banana" -> "3"; numeric-distance credit)

`chartok`: the character-level tokenizer they use; `base`: what they share; `demo`: `spa demo`."""

from __future__ import annotations

import importlib

TASK_NAMES = ("reverse", "add", "repeat", "spell", "count", "vowels")


def get_task(name: str):
    """The spa.tasks.base.Task called `name`."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"spa.tasks.{name}").TASK
