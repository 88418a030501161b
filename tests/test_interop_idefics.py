"""Our Flamingo family equals transformers' IdeficsForVisionText2Text on the same weights and inputs, both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from helpers import TINY_LLAMA
from mmalign.config import EncoderConfig, FlamingoConfig, LLMConfig, MediaConfig, ModelConfig
from mmalign.interop.hf_idefics import export_hf_idefics, idefics_options, import_hf_idefics
from mmalign.models.builder import build_model
from mmalign.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny_hf_idefics(tmp_path_factory, shapes):
    """A tiny random IDEFICS with every optional part on (qk norms in the resampler and the blocks, per-unit
    gates already open, a block every 2nd layer, a decoupled extra token), saved with its processor."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(shapes["tokenizer"])
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>"]}, replace_extra_special_tokens=False
    )
    config = IdeficsConfig(
        vocab_size=tok.vocab_size,
        additional_vocab_size=len(tok) - tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="vector",
        alpha_initializer="normal",
        alphas_initializer_range=0.5,
        use_resampler=True,
        vision_config=dict(
            embed_dim=24, image_size=32, intermediate_size=48, patch_size=8, num_hidden_layers=2, num_attention_heads=4
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=4,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=True,
        ),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = IdeficsForVisionText2Text(config).eval()
    out = tmp_path_factory.mktemp("hf_idefics")
    model.save_pretrained(out)
    IdeficsProcessor(
        IdeficsImageProcessorPil(image_size=32, image_mean=[0.4] * 3, image_std=[0.3] * 3), tok
    ).save_pretrained(out)
    return out


def _inputs(tokenizer, image_size=32):
    """Two rows without padding: row 0 has two images (text before the first), row 1 one image (IDEFICS pads
    its pixel values with a zero image, which its mask hides). Returns ids, IDEFICS pixels and mask, our media."""
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.randint(10, 60, (2, 12))
    ids[0, 2] = ids[0, 7] = ids[1, 4] = image
    pixels = torch.randn(2, 2, 3, image_size, image_size)
    pixels[1, 1] = 0
    latest, _ = image_attention_mask_for_packed_input_ids(ids, tokenizer, "pt")  # IDEFICS's own processor logic
    mask = incremental_to_binary_attention_mask(latest, "pt", num_classes=2)  # (B, T, images)
    ours = {"image": torch.cat([pixels[0], pixels[1, :1]])}  # items in row-major order
    return ids, pixels, mask, ours


def test_import_matches_idefics_logits(tiny_hf_idefics, tmp_path):
    hf = IdeficsForVisionText2Text.from_pretrained(tiny_hf_idefics).eval()
    ours, tokenizer, cfg = load_checkpoint(import_hf_idefics(tiny_hf_idefics, tmp_path / "ours"))
    assert cfg.flamingo.xattn_gate == "vector" and cfg.flamingo.xattn_qk_norm and cfg.flamingo.qk_norm
    assert sorted(map(int, ours.xattn)) == [0, 2]  # before layers 0, n, ... as IDEFICS places them
    ids, pixels, mask, media = _inputs(tokenizer)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
        got = ours(input_ids=ids, media=media)["logits"]
    # Our tokenizer gains <|endofchunk|> (IDEFICS has none): one more logit column, the others equal.
    assert got.shape[-1] == expected.shape[-1] + 1
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected)
    assert ours.encoders["image"].mean == pytest.approx((0.4,) * 3)  # the processor's normalisation travels


def test_export_loads_in_transformers_with_equal_logits(tiny_hf_idefics, tmp_path):
    ours, tokenizer, cfg = load_checkpoint(import_hf_idefics(tiny_hf_idefics, tmp_path / "ours"))
    with torch.no_grad():  # move away from the imported weights so the test cannot pass by reloading them
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf_idefics(ours, tokenizer, cfg, tmp_path / "hf")
    hf = IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    ids, pixels, mask, media = _inputs(tokenizer)
    with torch.no_grad():
        expected = ours(input_ids=ids, media=media)["logits"]
        got = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
    torch.testing.assert_close(got, expected)


def test_native_model_exports_through_the_idefics_processor(shapes, tmp_path):
    """A model built (not imported) with the IDEFICS options and scalar gates: the exported processor's pixels and
    image mask, fed to transformers, give our logits on our own preprocessing of the same images."""
    from mmalign.modalities.image import preprocess_for

    llm = {**TINY_LLAMA, "num_key_value_heads": TINY_LLAMA["num_attention_heads"], "num_hidden_layers": 2}
    text = type("Text", (), {**llm, "rms_norm_eps": 1e-6})
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    encoder = EncoderConfig(config={**vision, "patch_size": 8}, feature_layer=-1, keep_cls=True)
    cfg = ModelConfig(
        family="flamingo",
        media={"image": MediaConfig(encoder=encoder)},
        llm=LLMConfig(config={**llm, "rms_norm_eps": 1e-6}, tokenizer=str(shapes["tokenizer"])),
        flamingo=FlamingoConfig(
            num_latents=4, resampler_depth=1, resampler_heads=2, resampler_dim_head=8, **idefics_options(text)
        ),
    )
    model, tokenizer = build_model(cfg)
    model.eval()
    for block in model.xattn.values():
        block.attn_gate.data.fill_(0.8)
        block.ff_gate.data.fill_(-0.5)
    export_hf_idefics(model, tokenizer, cfg, tmp_path / "hf")
    hf = IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((30 + 9 * i, 41, 3)) * 255).astype("uint8")) for i in range(2)]
    enc = processor(text=[["a shape", images[0], "is red", images[1], "what color"]], return_tensors="pt")
    media = {"image": torch.stack([preprocess_for(im, model.encoders["image"]) for im in images])}
    torch.testing.assert_close(enc["pixel_values"][0], media["image"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        expected = model(input_ids=enc["input_ids"], media=media)["logits"]
        got = hf(
            input_ids=enc["input_ids"],
            pixel_values=media["image"][None],
            image_attention_mask=enc["image_attention_mask"],
        ).logits
    torch.testing.assert_close(got, expected)


def test_export_names_every_setting_idefics_cannot_express(shapes, tmp_path):
    from helpers import TINY_VISION

    cfg = ModelConfig(
        family="flamingo",
        media={"image": MediaConfig(encoder=EncoderConfig(config=dict(TINY_VISION)))},
        llm=LLMConfig(config=dict(TINY_LLAMA), tokenizer=str(shapes["tokenizer"])),
        flamingo=FlamingoConfig(num_latents=4, resampler_depth=1, resampler_heads=2, resampler_dim_head=8),
    )
    model, tokenizer = build_model(cfg)
    with pytest.raises(ValueError) as err:
        export_hf_idefics(model, tokenizer, cfg, tmp_path / "hf")
    message = str(err.value)
    for needed in (
        "key/value heads",
        "xattn_norm='rmsnorm'",
        "xattn_ff='swiglu'",
        "activation='relu'",
        "feature_layer=-1",
    ):
        assert needed in message, needed
    assert not (tmp_path / "hf").exists()


def test_cli_import_then_export(tiny_hf_idefics, tmp_path):
    from typer.testing import CliRunner

    from mmalign.cli import app

    runner = CliRunner()
    for args in (
        ["import", tiny_hf_idefics, "--format", "hf-idefics", "--out", tmp_path / "ours"],
        ["export", tmp_path / "ours", "--format", "hf-idefics", "--out", tmp_path / "hf"],
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
    hf = IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    original = IdeficsForVisionText2Text.from_pretrained(tiny_hf_idefics).eval()
    ids, pixels, mask, _ = _inputs(AutoTokenizer.from_pretrained(tiny_hf_idefics))
    with torch.no_grad():
        expected = original(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
        got = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected)  # the round trip adds <|endofchunk|>
    result = runner.invoke(app, ["export", str(tmp_path / "ours"), "--format", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "hf-idefics" in result.output
