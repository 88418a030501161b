"""Our model equals transformers' LlavaForConditionalGeneration on the same weights and inputs, both ways."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmalign.interop.hf_llava import export_hf_llava, import_hf_llava
from mmalign.train.checkpoint import load_checkpoint


def _inputs(model, n_text=7, batch=2):
    n_img = model.encoders["image"].num_tokens
    text = torch.randint(10, 20, (batch, n_text))
    image = torch.full((batch, n_img), model.media_token_ids["image"])
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)  # (B, 2 + image tokens + 5)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # some padding in the second row
    pixels = torch.randn(batch, 3, model.encoders["image"].image_size, model.encoders["image"].image_size)
    return ids, mask, pixels


def test_import_matches_hf_logits(tiny_hf_llava, tmp_path):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_hf_llava).eval()
    ours, _, _ = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    ids, mask, pixels = _inputs(ours)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, media={"image": pixels})["logits"]
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
        expected = ours(input_ids=ids, attention_mask=mask, media={"image": pixels})["logits"]
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected)


def test_exported_processor_matches_our_preprocessing(tiny_hf_llava, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from mmalign.modalities.image import preprocess_image

    ours, tok, cfg = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    ours.encoders["image"].mean, ours.encoders["image"].std = (
        (0.4, 0.5, 0.6),
        (0.2, 0.25, 0.3),
    )  # non-default, to see them travel
    export_hf_llava(ours, tok, cfg, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    rng = torch.Generator().manual_seed(0)
    array = (torch.rand(30, 52, 3, generator=rng) * 255).to(torch.uint8).numpy()  # not square
    image = Image.fromarray(array, "RGB")
    enc = processor(text="<image> what color is the shape ?", images=image, return_tensors="pt")
    assert int((enc["input_ids"] == ours.media_token_ids["image"]).sum()) == ours.encoders["image"].num_tokens
    expected = preprocess_image(
        image, ours.encoders["image"].image_size, ours.encoders["image"].mean, ours.encoders["image"].std
    )
    torch.testing.assert_close(enc["pixel_values"][0], expected, atol=1e-4, rtol=1e-4)
    # ... and importing the export keeps the normalisation.
    back, _, _ = load_checkpoint(import_hf_llava(tmp_path / "hf", tmp_path / "back"))
    assert back.encoders["image"].mean == pytest.approx(ours.encoders["image"].mean) and back.encoders[
        "image"
    ].std == pytest.approx(ours.encoders["image"].std)


def test_export_writes_the_settings_hf_reads_back(tiny_hf_llava, tmp_path):
    """Settings the logits tests cannot see: they only matter to transformers' own processor and generate."""
    from transformers import AutoConfig, AutoProcessor

    ours, tok, cfg = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp_path / "ours"))
    export_hf_llava(ours, tok, cfg, tmp_path / "hf")
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.image_seq_length == ours.encoders["image"].num_tokens
    assert config.projector_hidden_act == "gelu"
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.chat_template == tok.chat_template is not None
    assert processor.image_token == "<image>"
    assert processor.image_processor.resample == 3 and processor.image_processor.do_center_crop is False
