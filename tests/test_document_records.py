"""Interleaved documents and the error messages that quote a record: the shapes a record may take, the ids and
labels it becomes, and tokenizers that add their own bos or have none."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from helpers import image_processor
from mmalign.constants import END_OF_CHUNK, IGNORE_INDEX
from mmalign.data.dataset import ConversationDataset
from mmalign.data.processor import SampleError, parse_record

DOC = {
    "id": "d1",
    "text_list": ["a plain start .", "a red circle .", "two blue squares ."],
    "image_info": [{"image_name": "b.png", "matched_text_index": 2}, {"image_name": "a.png", "matched_text_index": 1}],
}


@pytest.fixture(scope="module")
def tok(shapes):
    return AutoTokenizer.from_pretrained(shapes["tokenizer"])


def with_post_bos(tok):
    """The tokenizer, made to prepend bos itself as Llama's does."""
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    assert tok("red")["input_ids"][0] == tok.bos_token_id
    return tok


def without_bos(tok):
    """The tokenizer, without a bos token at all."""
    tok = copy.deepcopy(tok)
    tok.bos_token = None
    return tok


def test_a_document_keeps_its_id_and_orders_images_by_their_text():
    conv = parse_record(DOC, 7)
    assert conv.id == "d1" and conv.media == {"image": ["a.png", "b.png"]}
    text = conv.messages[0]["content"]
    assert text == f"a plain start . <image>a red circle . {END_OF_CHUNK}<image>two blue squares .{END_OF_CHUNK}"


@pytest.mark.parametrize("post_bos", [False, True])
def test_document_ids_have_one_bos_and_train_only_after_the_first_image(tok, post_bos):
    tokenizer = with_post_bos(tok) if post_bos else tok
    proc = image_processor(tokenizer, tokens_per_image=2, image_size=16)
    ids, labels = proc.tokenize(parse_record(DOC, 0))
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id
    first = ids.index(image)
    words = tokenizer("a plain start .", add_special_tokens=False)["input_ids"]
    assert ids[1:first] == words and all(y == IGNORE_INDEX for y in labels[: first + 2])  # nothing to ground it
    trained = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert trained == [t for t in ids[first:] if t != image]  # every later token, the chunk ends and eos included


def test_a_tokenizer_without_bos_gives_a_document_without_one(tok):
    no_bos = without_bos(tok)
    ids, _ = image_processor(no_bos, tokens_per_image=2, image_size=16).tokenize(parse_record(DOC, 0))
    words = no_bos("a plain start .", add_special_tokens=False)["input_ids"]
    assert ids[: len(words)] == words


@pytest.mark.parametrize("kind", ["own", "adds-bos", "no-bos"])
def test_plain_template_has_one_bos_or_none(tok, kind):
    tokenizer = {"own": lambda t: t, "adds-bos": with_post_bos, "no-bos": without_bos}[kind](tok)
    record = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\ndescribe"},
                                                              {"from": "gpt", "value": "a red circle"}]}  # fmt: skip
    ids, labels = image_processor(tokenizer, tokens_per_image=2, image_size=16, template="plain").tokenize(
        parse_record(record, 0)
    )
    caption = tokenizer("a red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    image = tokenizer.convert_tokens_to_ids("<image>")
    bos = [] if kind == "no-bos" else [tok.bos_token_id]
    assert ids == [*bos, image, image, *caption]
    assert labels == [IGNORE_INDEX] * (len(bos) + 2) + caption


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"text_list": "one sentence"}, "text_list must be a list of strings"),
        ({"text_list": ["fine", 3]}, "text_list must be a list of strings"),
        ({"image_info": []}, "an interleaved document needs at least one image in image_info"),
        ({"image_info": ["a.png"]}, r"image_info\[0\] needs image_name and a matched_text_index within the 3 texts"),
        (
            {"image_info": [{"image_name": None, "matched_text_index": 0}]},
            r"image_info\[0\] needs image_name and a matched_text_index within the 3 texts",
        ),
        (
            {"image_info": [{"image_name": "a.png", "matched_text_index": 0}, {"image_name": "b.png"}]},
            r"image_info\[1\] needs image_name and a matched_text_index within the 3 texts",
        ),
        (
            {"image_info": [{"image_name": "a.png", "matched_text_index": 3}]},
            r"image_info\[0\] needs image_name and a matched_text_index within the 3 texts",
        ),
    ],
)
def test_bad_documents_name_the_sample_and_the_problem(change, problem):
    with pytest.raises(SampleError, match=f"^sample d1: {problem}$"):
        parse_record(DOC | change, 0)


@pytest.mark.parametrize(
    "speaker, shown",
    [
        ("x" * 78, "'" + "x" * 78 + "'"),  # a repr of exactly 80 characters is shown whole
        ("x" * 79, "'" + "x" * 79 + "... (str of 81 characters)"),
        (list(range(100)), repr(list(range(100)))[:80] + "... (list of 390 characters)"),
    ],
)
def test_a_long_value_is_cut_in_the_message_that_quotes_it(speaker, shown):
    record = {"id": "q", "conversations": [{"from": speaker, "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(SampleError) as err:
        parse_record(record, 0)
    assert err.value.problem == f"unknown speaker {shown} in turn 0 (expected human/gpt)"


def test_dataset_lengths_count_media_tokens_and_put_bad_records_in_their_own_group(tok, tmp_path):
    turns = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "i", "image": "a.png", "conversations": turns},
        {"id": "b", "conversations": []},
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]},
    ]
    proc = image_processor(tok, tokens_per_image=4, image_size=16)
    lengths, groups = ConversationDataset.from_records(records, tmp_path, proc).lengths()
    assert groups == ["image", "bad", "text"]
    assert lengths == [
        len(proc.tokenize(parse_record(records[0], 0))[0]),
        0,
        len(proc.tokenize(parse_record(records[2], 2))[0]),
    ]


def test_records_without_a_media_folder_read_their_paths_as_given(tok, tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)  # a relative path is read from the working directory, as a user would type it
    turns = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]
    record = {"id": "i", "image": "a.png", "conversations": turns}
    proc = image_processor(tok, tokens_per_image=4, image_size=16)
    item = ConversationDataset.from_records([record], None, proc, source="shard-0")[0]
    assert "error" not in item, item.get("error")
    assert item["media"]["image"].shape[-3:] == (3, 16, 16)
