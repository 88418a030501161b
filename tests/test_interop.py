"""Our model equals transformers' LlavaForConditionalGeneration on the same weights and inputs, both ways."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from mmalign.interop.hf_llava import export_hf_llava, import_hf_llava
from mmalign.train.checkpoint import load_checkpoint


def _inputs(model, n_text=7, batch=2):
    n_img = model.encoder.num_tokens
    text = torch.randint(10, 20, (batch, n_text))
    image = torch.full((batch, n_img), model.image_token_id)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)  # (B, 2 + image tokens + 5)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # some padding in the second row
    pixels = torch.randn(batch, 3, model.encoder.image_size, model.encoder.image_size)
    return ids, mask, pixels


def test_import_matches_hf_logits(tiny_hf_llava, tmp_path):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_hf_llava).eval()
    ours, _, _ = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    ids, mask, pixels = _inputs(ours)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)["logits"]
    torch.testing.assert_close(got, expected)


def test_export_matches_hf_logits(tiny_hf_llava, tmp_path):
    ours, tok, cfg = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    with torch.no_grad():  # move away from the imported weights so the test cannot pass by reloading them
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf_llava(ours, tok, cfg, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pixels = _inputs(ours)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)["logits"]
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected)


def test_exported_processor_loads_and_expands_image_tokens(tiny_hf_llava, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    ours, tok, cfg = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    export_hf_llava(ours, tok, cfg, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    enc = processor(text="<image> what color is the shape ?", images=image, return_tensors="pt")
    assert int((enc["input_ids"] == ours.image_token_id).sum()) == ours.encoder.num_tokens
    assert enc["pixel_values"].shape[-1] == ours.encoder.image_size
