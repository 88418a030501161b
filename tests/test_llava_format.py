"""Records exactly as they appear in LLaVA-Pretrain and LLaVA-Instruct (mix665k) load unchanged."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from helpers import image_processor
from mmalign.constants import IGNORE_INDEX
from mmalign.data.processor import parse_record, read_records

PRETRAIN = {
    "id": "004539375",
    "image": "00453/004539375.jpg",
    "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
    ],
}
INSTRUCT = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ],
}
TEXT_ONLY = {  # ShareGPT rows in mix665k carry no image key
    "id": "i6IyJda_0",
    "model": "",
    "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}],
}


def processor(tok, template):
    return image_processor(tok, tokens_per_image=3, image_size=8, template=template)


def test_json_and_jsonl_load_unchanged(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([PRETRAIN, INSTRUCT, TEXT_ONLY]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [PRETRAIN, INSTRUCT, TEXT_ONLY]))
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl") == [PRETRAIN, INSTRUCT, TEXT_ONLY]


def test_real_records_tokenize(shapes):
    tok = AutoTokenizer.from_pretrained(shapes["tokenizer"])
    image_id = tok.convert_tokens_to_ids("<image>")
    ids, labels = processor(tok, "plain").tokenize(parse_record(PRETRAIN, 0))
    assert ids.count(image_id) == 3 and ids[1:4] == [image_id] * 3  # plain: image first, prompt dropped
    ids, labels = processor(tok, "chat").tokenize(parse_record(INSTRUCT, 1))
    assert ids.count(image_id) == 3
    n_sup = sum(y != IGNORE_INDEX for y in labels)
    answers = sum(
        len(tok(t["value"], add_special_tokens=False)["input_ids"]) + 1 for t in INSTRUCT["conversations"][1::2]
    )
    assert n_sup == answers  # every answer token plus its <eos>, nothing else
    conv = parse_record(TEXT_ONLY, 2)
    assert conv.media == {} and conv.meta == {"model": ""}
    ids, _ = processor(tok, "chat").tokenize(conv)
    assert image_id not in ids
