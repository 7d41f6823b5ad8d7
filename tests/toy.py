"""Tiny offline building blocks for the examples, tests and benchmarks of the integrations: a character-level
tokenizer (spa.tasks.chartok's, over printable ASCII), a randomly initialised Llama and a small preference set.
Nothing is downloaded. Not part of the installed packages: examples and benchmarks import it from the checkout."""

from __future__ import annotations

import json

import torch

# printable ASCII: every prompt/response in tests/data and the examples tokenizes without <unk>
ALPHABET = "".join(chr(c) for c in range(32, 127))

ARITHMETIC = [(a, b) for a in range(10) for b in range(10)]


def char_tokenizer(alphabet: str = ALPHABET):
    """spa.tasks.chartok's tokenizer over `alphabet`: one token per character, <pad> (id 0), <s>, </s>, <unk>; a
    prefix of a string always tokenizes to a prefix of its tokens (what TRL's prompt/completion split relies on)."""
    from spa.tasks.chartok import char_tokenizer as chartok

    return chartok(alphabet)


def tiny_llama(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4,
               tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """A randomly initialised LlamaForCausalLM (seeded). vocab_size may exceed the tokenizer's (benchmarks use
    V >= 32000 with a character tokenizer: the softmax runs over the model's vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def load_preferences(path: str) -> list[dict]:
    """Rows of a JSONL file with string fields prompt, chosen, rejected; a clear error names a bad line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a string, got {row.get(key)!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no preference rows")
    return rows


def arithmetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """n pairs "a+b=" -> correct sum (chosen) vs a wrong one (rejected): a task a tiny model visibly learns."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in torch.randint(len(ARITHMETIC), (n,), generator=g).tolist():
        a, b = ARITHMETIC[i]
        wrong = (a + b + int(torch.randint(1, 9, (1,), generator=g))) % 19
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{wrong}"})
    return rows

