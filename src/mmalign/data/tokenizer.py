"""Tokenizers built from a dataset's text, saved so `AutoTokenizer.from_pretrained` loads them.

`build_word_tokenizer`: one id per seen word (the closed shapes world). `build_subword_tokenizer`: byte-level BPE
trained on the text, for users' own data. `build_data_tokenizer` is the entry point that picks one by name.
All share the special tokens and the chat template below."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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


# ------------------------------------------------------------------------------------------ subword tokenizers
# The word tokenizer above is exact for the closed shapes world but maps any unseen word to <unk>. A user's own
# LLaVA data needs a tokenizer that covers its text and still spells out what it has never seen.

TOKENIZER_KINDS = ("bpe", "word", "wordpiece")
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def text_segments(texts: Iterable[str]) -> list[str]:
    """The plain-text pieces between special tokens, stripped: what a subword model is trained on.

    Special tokens are matched before the model runs (and, in the BPE, absorb the whitespace around them, see
    `_special_added_tokens`), so the model itself never sees `<image>` or the spaces next to it."""
    return [seg.strip() for text in texts for seg in _SPECIAL_SPLIT.split(text) if seg.strip()]


def _special_added_tokens(strip: bool):
    from tokenizers import AddedToken

    # strip (lstrip/rstrip), for tokenizers that keep whitespace (byte-level BPE): the chat template writes a space
    # on each side of every special token ("<assistant> red <eos> "). Absorbing it keeps a dangling space token out
    # of every turn and, above all, makes the generation prompt end on <assistant> exactly like the training text
    # does, instead of on a lone space token. Tokenizers that drop whitespace anyway (WordPiece) must not strip:
    # the absorbed spaces would widen the token's offsets into the assistant span and mislabel <assistant>.
    # normalized=False: matched on the raw text, so a lowercasing normalizer cannot change them.
    return [AddedToken(t, lstrip=strip, rstrip=strip, special=True, normalized=False) for t in SPECIAL_TOKENS]


def _wrap(core, out_dir: str | Path | None, *, strip: bool) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` with our special tokens and chat template as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    core.add_special_tokens(_special_added_tokens(strip))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<system>", "<user>", "<assistant>"],
        # Cleanup would glue " ?" to the word before it when decoding WordPiece ("what is it ?" -> "what is it?");
        # transformers skips it for BPE anyway.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_subword_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, *, vocab_size: int = 1000, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`: at most `vocab_size` ids (fewer when the text runs out of pairs seen
    `min_frequency` times), never `<unk>`, case kept. Same special tokens and chat template as the word tokenizer.

    Every text segment gets a leading space (GPT-2's "Ġ"), so a word is the same token at the start of a turn as
    in the middle of a sentence; decoding therefore gives " answer", and callers `.strip()` (as the CLI does)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} < {len(SPECIAL_TOKENS) + len(alphabet)} (specials + 256 bytes)")
    core = Tokenizer(BPE(unk_token="<unk>"))  # only reachable if a byte were missing: loud, not a silent drop
    # No lowercasing: the shapes text is already lowercase (so it costs nothing there), and on a user's data it
    # would lose case for good, e.g. a decoded "Paris" would come back "paris".
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    # Offsets trimmed of spaces: the assistant mask labels every token whose offsets overlap a `{% generation %}`
    # span, so <assistant> must not claim the whitespace an answer starts with.
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0-7, in the same order as the word tokenizer
        initial_alphabet=alphabet,  # all 256 bytes, seen or not: any string encodes, so <unk> never appears
        show_progress=False,
    )
    core.train_from_iterator(text_segments(texts), trainer)
    return _wrap(core, out_dir, strip=True)


def build_wordpiece_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, *, base: str | Path | None = None, prune: bool = True
) -> PreTrainedTokenizerFast:
    """A pretrained WordPiece (MiniLM's BERT uncased by default) with our special tokens and chat template.

    `prune` keeps only the pieces `texts` use plus every single-character piece ("x" and "##x"), so unseen words
    still split into characters. Kept for comparison: it lowercases and strips accents (no exact round trip),
    characters outside BERT's ~1k-character alphabet (emoji, many scripts) become `<unk>`, and the tiny LMs are
    trained from scratch, so none of BERT's learned weights come along with its vocabulary."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordPiece
    from transformers import AutoTokenizer

    if base is None:
        from mmalign.contrastive.model import minilm_path

        base = minilm_path()
    source = AutoTokenizer.from_pretrained(base).backend_tokenizer
    theirs = {added.content for added in source.get_added_tokens_decoder().values() if added.special}
    pieces = [p for p, _ in sorted(source.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])]
    pieces = [p for p in pieces if p not in theirs and p not in SPECIAL_TOKENS]
    if prune:
        encodings = source.encode_batch(text_segments(texts), add_special_tokens=False)
        used = {tok for enc in encodings for tok in enc.tokens}
        pieces = [p for p in pieces if p in used or len(p.removeprefix("##")) == 1]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + pieces)}
    core = Tokenizer(WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##", max_input_chars_per_word=100))
    core.normalizer = source.normalizer
    core.pre_tokenizer = source.pre_tokenizer
    # No cleanup, like the BPE: the shapes text writes "shape ?" with a space and should decode the same way.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return _wrap(core, out_dir, strip=False)


def build_data_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    kind: str = "bpe",
    *,
    vocab_size: int = 1000,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Stage 0's tokenizer for a dataset's text. `kind`: "bpe" (default: byte-level BPE trained on `texts`, never
    `<unk>`), "word" (one id per seen word, closed vocabularies only) or "wordpiece" (MiniLM's WordPiece pruned
    to `texts`). `vocab_size` and `min_frequency` apply to "bpe"."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}; got {kind!r}")
    texts = list(texts)
    if kind == "bpe":
        return build_subword_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
    if kind == "word":
        return build_word_tokenizer(texts, out_dir)
    return build_wordpiece_tokenizer(texts, out_dir)
