"""Labels from per-turn spans, image-token expansion, and loud errors that name the sample."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from helpers import image_processor
from mmalign.constants import IGNORE_INDEX
from mmalign.data.processor import Conversation, SampleError, parse_record

N_IMG = 4


def make_processor(tokenizer, template="chat", max_length=128):
    return image_processor(tokenizer, tokens_per_image=N_IMG, image_size=16, template=template, max_length=max_length)


@pytest.fixture(scope="module")
def tok(shapes):
    return AutoTokenizer.from_pretrained(shapes["tokenizer"])


RECORD = {
    "id": "two-images",
    "image": ["a.png", "b.png"],
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nhow many shapes are there ?"},
        {"from": "gpt", "value": "two circles"},
    ],
}


def without_generation_tags(tok):
    """The same tokenizer with its template's {% generation %} tags taken out: the turn-by-turn path."""
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return plain


def supervised_words(tok, ids, labels):
    return [tok.convert_ids_to_tokens(t) for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]


def test_labels_cover_exactly_the_assistant_turns(tok):
    proc = make_processor(tok)
    ids, labels = proc.tokenize(parse_record(RECORD, 0))
    assert supervised_words(tok, ids, labels) == ["red", "<eos>", "two", "circles", "<eos>"]
    # Supervised labels are the token itself (no shift here: the model shifts).
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ids, labels, strict=True))
    # Both images expanded to N_IMG tokens each, and none of them is supervised.
    image_id = tok.convert_tokens_to_ids("<image>")
    assert sum(t == image_id for t in ids) == 2 * N_IMG
    assert all(y == IGNORE_INDEX for t, y in zip(ids, labels, strict=True) if t == image_id)


def test_prefix_fallback_gives_the_same_labels_as_generation_tags(tok):
    """A template without {% generation %} tags goes through the turn-by-turn path; labels must agree."""
    plain_tok = without_generation_tags(tok)
    conv = parse_record(RECORD, 0)
    assert make_processor(plain_tok).tokenize(conv) == make_processor(tok).tokenize(conv)


def test_template_that_rewrites_history_fails_loudly(tok):
    bad = AutoTokenizer.from_pretrained(tok.name_or_path)
    # Renders the last message differently from earlier ones, so a longer conversation does not extend a shorter.
    bad.chat_template = "{% for m in messages %}{% if loop.last %}<user> {% endif %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(SampleError, match="two-images.*does not extend"):
        make_processor(bad).tokenize(parse_record(RECORD, 0))


def test_generation_tags_that_miss_a_turn_fail_loudly(tok):
    """A template that tags only the last answer would leave the first unsupervised without a word."""
    bad = AutoTokenizer.from_pretrained(tok.name_or_path)
    bad.chat_template = tok.chat_template.replace(
        "{% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %}",
        "{% if loop.last %}{% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] }} {{ eos_token }}{% endif %}",
    )
    assert bad.chat_template != tok.chat_template
    with pytest.raises(SampleError, match="two-images.*chat template marked 1 assistant spans for 2 turns"):
        make_processor(bad).tokenize(parse_record(RECORD, 0))


def test_plain_template_supervises_only_the_caption(tok):
    rec = {"id": "c", "image": "a.png", "conversations": RECORD["conversations"][:2]}
    ids, labels = make_processor(tok, template="plain").tokenize(parse_record(rec, 0))
    assert tok.convert_ids_to_tokens(ids[0]) == "<bos>"
    assert supervised_words(tok, ids, labels) == ["red", "<eos>"]
    assert len(ids) == 1 + N_IMG + 2


def test_text_only_sample_has_no_image_tokens(tok):
    rec = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}
    ids, _ = make_processor(tok).tokenize(parse_record(rec, 0))
    assert tok.convert_tokens_to_ids("<image>") not in ids


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "e1", "image": "a.png", "conversations": []}, "e1: empty conversation"),
        ({"id": "e2", "conversations": [{"from": "bot", "value": "x"}]}, "e2: unknown speaker"),
        ({"id": "e3", "conversations": [{"from": "human", "value": "x"}]}, "e3: conversation has no assistant"),
        (
            {"id": "e4", "image": ["a.png", "b.png"], "conversations": RECORD["conversations"][:2]},
            "e4: 1 <image> placeholders in the text but 2 image items",
        ),
        (
            {"id": "e5", "conversations": RECORD["conversations"][:2]},
            "e5: 1 <image> placeholders in the text but 0 image items",
        ),
        ({"id": "e6", "conversations": ["hello", "hi"]}, "e6: conversations must be a list"),
        ({"id": "e7", "image": 3, "conversations": RECORD["conversations"][:2]}, "e7: image must be a path"),
    ],
)
def test_bad_records_name_the_sample(tok, record, message):
    with pytest.raises(SampleError, match=message):
        make_processor(tok).tokenize(parse_record(record, 0))


def test_too_long_sample_is_an_error(tok):
    with pytest.raises(SampleError, match=r"two-images: \d+ tokens exceed max_length 10"):
        make_processor(tok, max_length=10).tokenize(parse_record(RECORD, 0))


def test_missing_and_unreadable_images(tok, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    proc = make_processor(tok)
    with pytest.raises(SampleError, match="m1: image file not found"):
        proc.media(Conversation(id="m1", media={"image": ["nope.png"]}, messages=[]), tmp_path)
    with pytest.raises(SampleError, match="m2: unreadable image"):
        proc.media(Conversation(id="m2", media={"image": ["broken.png"]}, messages=[]), tmp_path)


def test_prompt_ids_end_with_the_assistant_header(tok):
    conv = parse_record(RECORD, 0)
    ids = make_processor(tok).prompt_ids(conv)
    assert tok.convert_ids_to_tokens(ids[-1]) == "<assistant>"
    assert "circles" not in tok.convert_ids_to_tokens(ids)  # the answer being asked for is not in the prompt


DOCUMENT = {
    "id": "doc-1",
    "text_list": ["a page about shapes .", "a red circle .", "more text .", "two blue squares .", "the end ."],
    "image_info": [
        {"image_name": "b.png", "matched_text_index": 3},
        {"image_name": "a.png", "matched_text_index": 1},
    ],
}


def test_interleaved_document_chunks_and_labels(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>"]}, replace_extra_special_tokens=False)
    conv = parse_record(DOCUMENT, 0)
    assert conv.media == {"image": ["a.png", "b.png"]}  # in the order they appear in the text
    text = conv.messages[0]["content"]
    assert text == (
        "a page about shapes . <image>a red circle . more text . <|endofchunk|><image>two blue squares . the end ."
        "<|endofchunk|>"
    )
    proc = image_processor(tok, tokens_per_image=1, image_size=16, template="plain")  # documents ignore the template
    ids, labels = proc.tokenize(conv)
    words = supervised_words(tok, ids, labels)
    assert words[0] == "a" and "page" not in words  # text before the first image is context only
    assert "<image>" not in words and words.count("<|endofchunk|>") == 2 and words[-1] == "<eos>"


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"image_info": []}, "at least one image"),
        ({"image_info": [{"image_name": "a.png", "matched_text_index": 9}]}, "within the 5 texts"),
        ({"text_list": ["x", "  "], "image_info": [{"image_name": "a.png", "matched_text_index": 1}]}, "no text after"),
    ],
)
def test_bad_documents_are_named(change, problem):
    with pytest.raises(SampleError, match=f"sample doc-1: .*{problem}"):
        parse_record({**DOCUMENT, **change}, 0)


def test_several_training_files_mix_and_errors_name_the_file(tok, shapes, tmp_path):
    from mmalign.config import RecipeConfig, apply_overrides
    from mmalign.data.dataset import ConversationDataset
    from mmalign.data.processor import read_records

    (tmp_path / "extra.json").write_text(json.dumps([RECORD, {"id": "broken", "conversations": []}]))
    cfg = apply_overrides(RecipeConfig(), [f"data.train=[{shapes['conversations']},{tmp_path / 'extra.json'}]"])
    assert cfg.data.train == [shapes["conversations"], str(tmp_path / "extra.json")]
    ds = ConversationDataset(cfg.data.train, shapes["images"], make_processor(tok))
    n = len(read_records(shapes["conversations"]))
    assert len(ds) == n + 2
    assert ds[0]["id"] == read_records(shapes["conversations"])[0]["id"] and "error" not in ds[0]
    assert ds[n]["id"] == "two-images"  # the second file follows the first
    assert ds[n + 1]["error"].startswith(f"{tmp_path / 'extra.json'}: sample broken")
    single = ConversationDataset(str(tmp_path / "extra.json"), shapes["images"], make_processor(tok))
    assert single[1]["error"].startswith("sample broken")  # one file: the message is the sample's alone


def test_a_system_turn_is_rendered_but_never_supervised(tok):
    rec = RECORD | {"conversations": [{"from": "system", "value": "answer briefly"}, *RECORD["conversations"]]}
    conv = parse_record(rec, 0)
    ids, labels = make_processor(tok).tokenize(conv)
    assert tok.convert_ids_to_tokens(ids[:2]) == ["<bos>", "<system>"]
    assert supervised_words(tok, ids, labels) == ["red", "<eos>", "two", "circles", "<eos>"]
    plain_tok = without_generation_tags(tok)
    assert make_processor(plain_tok).tokenize(conv) == (ids, labels)


def test_a_template_with_generation_tags_that_refuses_a_conversation_names_the_sample(tok):
    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = "{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}"
    strict.chat_template += tok.chat_template
    with pytest.raises(SampleError, match="^sample two-images: the chat template refused the conversation: roles must"):
        make_processor(strict).tokenize(parse_record(RECORD, 0))


def test_processor_for_takes_the_recipe_template_chat_template_and_max_length(shapes):
    from helpers import tiny_model_config
    from mmalign.config import DataConfig
    from mmalign.data.processor import processor_for
    from mmalign.models.builder import build_model

    model, tok = build_model(tiny_model_config(shapes["tokenizer"]))
    rec = {"id": "c", "image": "a.png", "conversations": RECORD["conversations"][:2]}
    conv = parse_record(rec, 0)
    n_media = model.tokens_per_item("image")
    ids, labels = processor_for(model, tok, DataConfig(template="plain")).tokenize(conv)
    assert len(ids) == 1 + n_media + 2 and supervised_words(tok, ids, labels) == ["red", "<eos>"]
    with pytest.raises(SampleError, match=f"^sample c: {n_media + 3} tokens exceed max_length {n_media + 2}$"):
        processor_for(model, tok, DataConfig(template="plain", max_length=n_media + 2)).tokenize(conv)
    prompt = "{% if add_generation_prompt %}"
    own = tok.chat_template.replace(prompt + "<assistant> ", prompt + "<user> ")
    assert own != tok.chat_template
    proc = processor_for(model, tok, DataConfig(chat_template=own))
    assert tok.chat_template == own and tok.convert_ids_to_tokens(proc.prompt_ids(conv)[-1]) == "<user>"


def test_media_paths_without_a_folder_are_read_from_the_working_directory(tok, tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    rec = {"id": "c", "image": "a.png", "conversations": RECORD["conversations"][:2]}
    pixels = make_processor(tok).media(parse_record(rec, 0))["image"]
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels[0, 0], torch.ones(16, 16)) and torch.allclose(pixels[0, 1], -torch.ones(16, 16))


def test_an_answer_at_the_very_start_of_the_rendered_text_is_its_own_span(tok):
    """A template without a bos token or a role marker before the answer: the first token opens a span, and an
    answer that ends the text does not join it."""
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}<user> {{ m['content'] }} {% endif %}{% endfor %}"
    )
    turns = [{"from": "gpt", "value": "red"}, {"from": "human", "value": "blue ?"}, {"from": "gpt", "value": "two"}]
    ids, labels = make_processor(bare).tokenize(parse_record({"id": "g", "conversations": turns}, 0))
    assert tok.convert_ids_to_tokens(ids) == ["red", "<user>", "blue", "?", "two"]
    assert labels == [ids[0], IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, ids[-1]]


def test_a_processor_reads_chat_by_default_and_refuses_an_unknown_or_impossible_template(tok):
    from mmalign.data.processor import Processor

    turns = [{"from": "human", "value": "what color is the shape ?"}, {"from": "gpt", "value": "red"}]
    conv = parse_record({"id": "t", "conversations": turns}, 0)
    assert Processor(tok, media=[]).tokenize(conv) == make_processor(tok, max_length=2048).tokenize(conv)
    with pytest.raises(ValueError) as err:
        Processor(tok, media=[], template="chatml")
    assert str(err.value) == "template must be chat or plain, got 'chatml'"
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError) as err:
        Processor(bare, media=[])
    assert str(err.value) == "template=chat but the tokenizer has no chat_template"
    ids, _ = Processor(bare, media=[], template="plain").tokenize(conv)  # plain needs no template
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "red", "<eos>"]


def test_max_length_is_the_longest_sample_kept_2048_by_default(tok):
    from mmalign.data.processor import Processor

    def conv(words):
        turns = [{"from": "human", "value": "red " * words}, {"from": "gpt", "value": "red"}]
        return parse_record({"id": f"w{words}", "conversations": turns}, 0)

    overhead = len(Processor(tok, media=[]).tokenize(conv(1))[0]) - 1
    exact = conv(2048 - overhead)
    assert len(Processor(tok, media=[]).tokenize(exact)[0]) == 2048  # exactly the limit: kept
    with pytest.raises(SampleError, match=f"^sample w{2049 - overhead}: 2049 tokens exceed max_length 2048$"):
        Processor(tok, media=[]).tokenize(conv(2049 - overhead))
    with pytest.raises(SampleError, match=f"^sample w{2048 - overhead}: 2048 tokens exceed max_length 2047$"):
        Processor(tok, media=[], max_length=2047).tokenize(exact)


def test_conversations_that_cannot_train_name_the_sample(tok):
    from mmalign.data.processor import Conversation, MediaSpec, Processor

    def refusal(proc, messages, media=None):
        with pytest.raises(SampleError) as err:
            proc.tokenize(Conversation(id="q", media=media or {}, messages=messages))
        return str(err.value)

    proc = make_processor(tok)
    assert refusal(proc, []) == "sample q: empty conversation"
    system_last = [{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}]
    assert refusal(proc, system_last) == "sample q: ends with a system turn that has no gpt answer"
    user_last = [{"role": "user", "content": "hi"}]
    assert refusal(proc, user_last) == "sample q: ends with a human turn that has no gpt answer"
    answer = [*user_last, {"role": "assistant", "content": "red"}]
    assert refusal(proc, answer, {"video": ["v.mp4"], "audio": ["a.wav"]}) == (
        "sample q: has audio, video but this model reads only image"
    )
    second = MediaSpec(modality="video", placeholder="<video>", token_id=5, tokens_per_item=2, encoder=None)
    two = Processor(tok, media=[*proc.specs.values(), second])
    assert refusal(two, answer, {"audio": ["a.wav"]}) == "sample q: has audio but this model reads only image, video"
    silent = AutoTokenizer.from_pretrained(tok.name_or_path)  # renders an answer as its text alone, no end token
    silent.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<user> {% endif %}{{ m['content'] }} {% endfor %}"
    )
    empty_answer = [*user_last, {"role": "assistant", "content": ""}]
    assert refusal(make_processor(silent), empty_answer) == "sample q: no supervised tokens"


def test_a_mixed_training_set_needs_one_fraction_per_file_and_draws_each_share_by_the_seed(tok, shapes):
    from mmalign.data.dataset import ConversationDataset

    files = [shapes["conversations"], shapes["captions"]]
    with pytest.raises(ValueError) as err:
        ConversationDataset(files, shapes["images"], make_processor(tok), fractions=[0.5])
    assert str(err.value) == "1 data fractions for 2 training files: give one per file"

    def quarters(seed, files):
        return ConversationDataset(files, shapes["images"], make_processor(tok), [0.25] * len(files), seed).records

    first = quarters(3, [shapes["captions"]])
    assert first == quarters(3, [shapes["captions"]])  # a resumed run trains on the same set
    twice = quarters(3, [shapes["captions"]] * 2)  # each file draws its own share
    assert len(twice) == 2 * len(first) and twice[: len(first)] != twice[len(first) :]
