"""Few-shot prompts, demonstration choice (random and RICES), the embedded episodes and the per-shot report."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmalign.data.processor import parse_record, read_records
from mmalign.data.shapes import ATTRIBUTES, Scene, write_fewshot
from mmalign.fewshot import build_prompt, choose_demos, evaluate_fewshot

DEMOS = [
    {"id": "d1", "image": "a.png", "question": "what color ?", "answer": "red"},
    {"id": "d2", "image": "b.png", "question": "what color ?", "answer": "blue"},
]
QUERY = {"id": "q", "image": "c.png", "question": "what color ?", "answer": "green"}


def test_prompt_layout():
    conv = build_prompt(DEMOS, QUERY, "<image>")
    assert conv.messages[0]["content"] == (
        "<image>what color ? red<|endofchunk|><image>what color ? blue<|endofchunk|><image>what color ?"
    )
    assert conv.media == {"image": ["a.png", "b.png", "c.png"]}
    text_only = build_prompt(DEMOS, {**QUERY, "question": ""}, "<image>", text_only=True)
    assert text_only.messages[0]["content"] == "what color ? red<|endofchunk|>what color ? blue<|endofchunk|><image>"
    assert text_only.media == {"image": ["c.png"]}  # the Flamingo 0-shot protocol drops the demos' images


def test_rices_puts_the_most_similar_last():
    similarity = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert choose_demos([10, 11, 12, 13, 14], 3, random.Random(0), similarity) == [12, 13, 11]
    picked = choose_demos([10, 11, 12, 13, 14], 3, random.Random(0))
    assert len(set(picked)) == 3 and set(picked) <= {10, 11, 12, 13, 14}


def test_episodes_hide_one_attribute_per_document(shapes):
    files = write_fewshot(shapes["images"].rsplit("/", 1)[0], n_docs=20, n_support=10, seed=0)
    scenes = json.loads(open(shapes["images"].rsplit("/", 1)[0] + "/scenes.json").read())
    for index, record in enumerate(read_records(files["interleaved"])):
        conv = parse_record(record, index)
        assert 2 <= len(conv.media["image"]) <= 9
        answers = [record["text_list"][info["matched_text_index"]] for info in record["image_info"]]
        scene = [Scene(**scenes[info["image_name"]]) for info in record["image_info"]]
        # One attribute explains every answer of the document.
        assert any(all(s.answer(a) == x for s, x in zip(scene, answers, strict=True)) for a in ATTRIBUTES)
        assert all(name.startswith("train_") and name in scenes for name in conv.media["image"])
    test = read_records(files["fewshot_test"])
    assert {r["question_type"] for r in test} == set(ATTRIBUTES)
    assert all(r["image"].startswith("test_") for r in test)


def test_report_per_shot_and_enough_support(shapes, tmp_path):
    from mmalign.config import DataConfig
    from mmalign.data.processor import processor_for
    from mmalign.models.builder import build_model
    from test_flamingo import flamingo_config

    folder = shapes["images"].rsplit("/", 1)[0]
    files = write_fewshot(folder, n_docs=4, n_support=10, seed=0)
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    proc = processor_for(model, tok, DataConfig(template="chat"))
    out = evaluate_fewshot(model, proc, files["fewshot_test"], files["support"], shapes["images"], shots=[0, 2],
                           select="rices", limit=6, progress=False)  # fmt: skip
    assert sorted(out["shots"]) == [0, 2] and all(r["n"] == 6 for r in out["shots"].values())
    assert out["select"] == "rices" and out["zero_shot"] == "text-demos"
    with pytest.raises(ValueError, match="support examples of type"):
        evaluate_fewshot(model, proc, files["fewshot_test"], files["support"], shapes["images"], shots=[16],
                         limit=2, progress=False)  # fmt: skip
