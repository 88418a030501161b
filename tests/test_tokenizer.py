"""Data tokenizers: the BPE default never emits <unk>, keeps the special tokens whole, and labels exactly the
assistant text + eos through the chat template; the word tokenizer cannot handle unseen words (why BPE exists)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mmalign.data.shapes import corpus_texts
from mmalign.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_data_tokenizer,
    build_subword_tokenizer,
    build_word_tokenizer,
)

UNSEEN = [
    "Paris",
    "The Eiffel Tower is 330 metres tall.",
    "Zebras graze near Lake Victoria in 2024!",
    "Naïve café in Zürich, crème brûlée 🍮",
    "東京 и Москва — ÀÉÎÕÜ",
    'tabs\tand\nnewlines, "quotes" & <tags>',
    "what color is the shape ?",  # the shapes style: spaces before punctuation must survive decoding
]
ANSWERS = ["red", "three small circles", "Paris", "42", "東京", "It's 7:45 pm."]


@pytest.fixture(scope="module")
def train_texts(shapes) -> list[str]:
    records = []
    for key in ("captions", "conversations"):
        with open(shapes[key]) as f:
            records += json.load(f)
    return corpus_texts(records)


@pytest.fixture(scope="module")
def bpe(train_texts):
    return build_subword_tokenizer(train_texts)


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def subword(request, bpe, train_texts):
    """The tokenizers meant for open text; both must honour the shared special tokens and template."""
    return bpe if request.param == "bpe" else build_data_tokenizer(train_texts, kind="wordpiece")


def conversation(answers: list[str]) -> list[dict]:
    messages = [{"role": "system", "content": "Answer briefly."}]
    for i, answer in enumerate(answers):
        messages += [
            {"role": "user", "content": ("<image>\n" if i == 0 else "") + f"Question {i} ?"},
            {"role": "assistant", "content": answer},
        ]
    return messages


def test_bpe_never_emits_unk(bpe):
    for text in UNSEEN:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.unk_token_id not in ids, text


def test_word_tokenizer_maps_unseen_words_to_unk(train_texts):
    # Documents the limitation the subword tokenizer removes: a closed word list cannot spell a new word.
    word = build_word_tokenizer(train_texts)
    assert word("paris")["input_ids"] == [word.unk_token_id]
    assert word.decode(word("red zebra")["input_ids"]) == "red <unk>"


@pytest.mark.parametrize("text", ["<image>\nwhat is it?", "<image>what", "a photo<image>of", "<image><image>\n"])
def test_image_token_is_one_id_in_glued_text(subword, text):
    ids = subword(text, add_special_tokens=False)["input_ids"]
    image_id = subword.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == text.count("<image>")
    assert subword.unk_token_id not in ids


def test_special_tokens_are_single_ids(subword):
    ids = [subword(t, add_special_tokens=False)["input_ids"] for t in SPECIAL_TOKENS]
    assert ids == [[i] for i in range(len(SPECIAL_TOKENS))]  # same ids as the word tokenizer
    assert (subword.pad_token, subword.unk_token, subword.bos_token, subword.eos_token) == tuple(SPECIAL_TOKENS[:4])
    assert subword.chat_template == CHAT_TEMPLATE


def test_assistant_mask_is_answers_plus_eos(subword):
    # Leading/trailing whitespace in an answer is absorbed by the special tokens next to it, so the labels are the
    # stripped answer's ids; the <assistant> token before it must stay unlabelled.
    answers = [*ANSWERS, "\n  padded answer  "]
    out = subword.apply_chat_template(
        conversation(answers), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    labelled = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    want = [
        t for a in answers for t in subword(a.strip(), add_special_tokens=False)["input_ids"] + [subword.eos_token_id]
    ]
    assert labelled == want


def test_bpe_word_is_one_token_anywhere_in_a_turn(bpe):
    # Every segment gets a leading space, so a one-word answer shares its id with the same word mid-caption.
    assert (
        bpe("red", add_special_tokens=False)["input_ids"]
        == bpe("a small red", add_special_tokens=False)["input_ids"][-1:]
    )
    assert len(bpe("red")["input_ids"]) == 1


def test_generation_prompt_is_a_prefix_of_the_training_text(bpe):
    # The template writes "<assistant> answer"; the model must see the same ids before its answer at inference,
    # not a dangling space token it never saw in training.
    messages = conversation(["Paris"])
    prompt = bpe.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = bpe.apply_chat_template(messages, tokenize=True, return_dict=True)
    n = len(prompt["input_ids"])
    assert full["input_ids"][:n] == prompt["input_ids"]
    assert full["input_ids"][n:] == bpe("Paris", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]


@pytest.mark.parametrize("answer", ANSWERS)
def test_generated_answer_decodes_back(bpe, answer):
    generated = bpe(answer, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id, bpe.pad_token_id]
    assert bpe.decode(generated, skip_special_tokens=True).strip() == answer


def test_bpe_round_trips_unseen_text(bpe):
    for text in UNSEEN:
        assert bpe.decode(bpe(text)["input_ids"], skip_special_tokens=True).strip() == text


def test_bpe_vocabulary_stays_small(train_texts):
    # The shapes text has few distinct words: merges stop well short of the budget (no oversized embedding).
    tok = build_subword_tokenizer(train_texts, vocab_size=1000)
    assert 8 + 256 < len(tok) < 1000
    assert len(build_subword_tokenizer(train_texts, vocab_size=300)) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_subword_tokenizer(train_texts, vocab_size=100)


def test_save_and_autotokenizer_load_give_identical_ids(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*UNSEEN, "<image>\nwhat is it?"]:
        assert loaded(text)["input_ids"] == bpe(text)["input_ids"]
    kw = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ours, theirs = (
        bpe.apply_chat_template(conversation(ANSWERS), **kw),
        loaded.apply_chat_template(conversation(ANSWERS), **kw),
    )
    assert (theirs["input_ids"], theirs["assistant_masks"]) == (ours["input_ids"], ours["assistant_masks"])
    assert len(loaded) == len(bpe)


def test_build_data_tokenizer_dispatches_and_saves(train_texts, tmp_path):
    tok = build_data_tokenizer(iter(train_texts), tmp_path / "tok")  # any iterable, consumed once
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert tok.unk_token_id not in tok("Zebra!")["input_ids"]
    word = build_data_tokenizer(train_texts, kind="word")
    assert word("zebra")["input_ids"] == [word.unk_token_id]
    with pytest.raises(ValueError, match="kind"):
        build_data_tokenizer(train_texts, kind="sentencepiece")
