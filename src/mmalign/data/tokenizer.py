"""A word-level tokenizer built from a data vocabulary, saved so `AutoTokenizer.from_pretrained` loads it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<system>", "<user>", "<assistant>"]

# `{% generation %}` marks the assistant tokens, so labels come from the template's own spans.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<system> {{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> "
    "{% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_word_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None):
    """Vocabulary = every lowercased word and punctuation mark in `texts`, plus the special tokens."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    words -= set(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(words))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<system>", "<user>", "<assistant>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
