"""A character-level tokenizer with a chat template, as a real transformers tokenizer (saved with save_pretrained
and loaded with AutoTokenizer like any hub tokenizer)."""

from __future__ import annotations

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


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character (unknown characters -> <unk>), special tokens for BOS/EOS/PAD and the roles."""
    vocab = {t: i for i, t in enumerate(list(SPECIAL.values()) + list(ROLES) + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=list(ROLES), **SPECIAL)
    tok.chat_template = CHAT_TEMPLATE
    return tok
