"""Captioning pretraining of the image tower (`--vision caption`): caption layout, parallel prediction, and a tower
that learns to tell the decoder what is on each side of held-out images."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from mmalign.constants import IGNORE_INDEX
from mmalign.contrastive.captioning import Captioner, CaptioningObjective, encode_captions, train_captioner
from mmalign.data.tokenizer import build_data_tokenizer
from mmalign.models.encoders import clip_encoder, load_tower
from mmalign.quickstart import pretrain_base

COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 230), "yellow": (240, 220, 30)}


def two_sides(folder, n: int, seed: int = 0) -> list[dict]:
    """Images whose left and right halves have their own colour, captioned left first."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        left, right = rng.choice(list(COLORS)), rng.choice(list(COLORS))
        img = Image.new("RGB", (64, 64), COLORS[left])
        img.paste(Image.new("RGB", (32, 64), COLORS[right]), (32, 0))
        img.save(folder / "images" / f"{i}.png")
        records.append({
            "id": str(i),
            "image": f"{i}.png",
            "conversations": [{"from": "human", "value": "<image>\ndescribe ."},
                              {"from": "gpt", "value": f"{left} on the left and {right} on the right"}],
        })  # fmt: skip
    (folder / "captions.json").write_text(json.dumps(records))
    return records


def tokenizer_for(records, tmp_path):
    return build_data_tokenizer([r["conversations"][1]["value"] for r in records] * 2, tmp_path / "tok")


def test_captions_are_bos_text_eos_then_padding(tmp_path):
    tok = tokenizer_for([{"conversations": [{}, {"value": "red on the left"}]}], tmp_path)
    ids, labels = encode_captions(tok, ["red on the left", "red"], max_length=12)
    words = tok("red on the left", add_special_tokens=False)["input_ids"]
    assert ids[0, : len(words) + 2].tolist() == [tok.bos_token_id, *words, tok.eos_token_id]
    assert ids[0, len(words) + 2 :].eq(tok.pad_token_id).all()
    assert (
        labels[0, len(words) + 2 :].eq(IGNORE_INDEX).all()
        and labels[0, : len(words) + 2].eq(ids[0, : len(words) + 2]).all()
    )
    assert labels[1].ne(IGNORE_INDEX).sum() == len(tok("red", add_special_tokens=False)["input_ids"]) + 2


def test_parallel_prediction_masks_every_decoder_input_after_bos(tmp_path):
    records = two_sides(tmp_path, 4)
    tok = tokenizer_for(records, tmp_path)
    model = Captioner(clip_encoder(preset="tiny-vit"), tok).eval()
    pixels = torch.rand(4, 3, 64, 64)
    ids, labels = encode_captions(tok, [r["conversations"][1]["value"] for r in records], max_length=16)
    batch = {"pixels": pixels, "input_ids": ids, "labels": labels, "index": torch.arange(4)}
    length = int(labels.ne(IGNORE_INDEX).sum(1).max())
    masked = ids[:, :length].clone()
    masked[:, 1:] = model.mask_id
    for share, inputs in ((0.0, ids[:, :length]), (1.0, masked)):
        objective = CaptioningObjective(model, pixels, ids, labels, parallel=share, augment=None)
        got = objective.losses(batch | {"parallel": torch.full((4,), share > 0.5)})["caption"]
        assert torch.allclose(got, model(pixels, inputs, labels[:, :length]))
    assert objective.counts(batch)["caption"] == int(labels[:, 1:].ne(IGNORE_INDEX).sum())


def test_captioning_teaches_the_tower_what_each_side_shows(tmp_path):
    records = two_sides(tmp_path, 240)
    tok = tokenizer_for(records, tmp_path)
    result = train_captioner(tmp_path / "captions.json", tmp_path / "images", tok, tmp_path / "run", steps=60,
                             batch_size=32, progress=False)  # fmt: skip
    # Held-out captions cost less given the image than given a blank one. Two colour words out of about 11 tokens at
    # log 4 nats each bound the gap near 0.25 nats per token: most of it must come from the tokens.
    assert result["blank_image_loss"] - result["held_out_loss"] > 0.12
    assert result["last_loss"] < result["first_loss"] / 2
    tower = load_tower(tmp_path / "run" / "image_encoder")
    assert tower(torch.rand(1, 3, 64, 64)).shape == (1, 64, 64)


def test_caption_tower_needs_caption_like_records(tmp_path):
    records = two_sides(tmp_path, 2)
    for r in records:
        r["conversations"] = r["conversations"] * 2  # two turns each: conversations, not captions
    (tmp_path / "conversations.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="vision=caption needs caption-like records"):
        pretrain_base([tmp_path / "conversations.json"], tmp_path / "images", tmp_path / "base", vision="caption")
