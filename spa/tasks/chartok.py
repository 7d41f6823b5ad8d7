"""A character-level tokenizer with a chat template, as a real transformers tokenizer (saved with save_pretrained
and loaded with AutoTokenizer like any hub tokenizer). For a task of your own, build it from the characters of
your data, so that no character becomes <unk>:

    from spa.tasks.chartok import char_tokenizer, data_chars
    tok = char_tokenizer(data_chars("sft.jsonl", "prefs.jsonl", "eval_prompts.jsonl"))
    tok.save_pretrained("tokenizer")        # then model.tokenizer: tokenizer in the config

(The default alphabet, CHARS, covers lower-case letters, digits, space and `.,:;!?'-()` only: no upper case, no
`+`.) Text outside the vocabulary becomes <unk>; every stage counts such tokens (data/unknown_tokens in its
metrics) and logs a warning naming the characters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'-()"
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# <s><|user|>reverse: abc<|assistant|>cba</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _strings(value, key: str | None = None):
    if isinstance(value, str):
        if key != "role":  # role names are rendered by the chat template, not tokenized as text
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)


def data_chars(*sources: str | Iterable[str]) -> str:
    """Every character of the text in some data files (.jsonl or .json; every string value of every row, at any
    depth, except chat-message role names) or strings, sorted: the alphabet for char_tokenizer."""
    chars: set[str] = set()
    for src in sources:
        if isinstance(src, str) and src.endswith((".jsonl", ".json")) and os.path.exists(src):
            with open(src, encoding="utf-8-sig") as f:
                rows = [json.loads(line) for line in f if line.strip()] if src.endswith(".jsonl") else [json.load(f)]
            for row in rows:
                for text in _strings(row):
                    chars.update(text)
        elif isinstance(src, str) and src.endswith((".jsonl", ".json")):  # a file name that is not there: a typo,
            raise FileNotFoundError(f"data_chars: {src} does not exist")   # not a string of characters
        elif isinstance(src, str):
            chars.update(src)
        else:
            for text in src:
                chars.update(text)
    return "".join(sorted(chars))


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of `chars` (the characters of your data, e.g. data_chars(files); the default is
    the built-in tasks' alphabet CHARS), special tokens for BOS/EOS/PAD/UNK and the chat roles, and a chat
    template. Characters outside `chars` become <unk>."""
    vocab = {t: i for i, t in enumerate(list(SPECIAL.values()) + list(ROLES) + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=list(ROLES), **SPECIAL)
    tok.chat_template = CHAT_TEMPLATE
    return tok
