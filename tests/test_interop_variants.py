"""The HF Llava converter beyond the default settings: which layer and tokens the tower hands on, a projector
without bias, a SigLIP tower, each compared by logits both ways; and the settings it refuses, by name."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from helpers import write_llava
from mmalign.interop.hf_llava import export_hf_llava, import_hf_llava
from mmalign.train.checkpoint import load_checkpoint


def inputs(model):
    n_img = model.encoders["image"].num_tokens
    text = torch.randint(10, 20, (2, 6))
    image = torch.full((2, n_img), model.media_token_ids["image"])
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    pixels = torch.randn(2, 3, 32, 32)
    return ids, mask, pixels


VARIANTS = {
    "last-layer": dict(vision_feature_layer=-1),
    "third-last-layer": dict(vision_feature_layer=-3),
    "full-strategy": dict(vision_feature_select_strategy="full"),
    "no-projector-bias": dict(multimodal_projector_bias=False),
    "siglip": dict(tower="siglip", vision_feature_select_strategy="full", vision_feature_layer=-1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_import_and_export_with_equal_logits(variant, shapes, tmp_path):
    kw = dict(VARIANTS[variant])
    tower = kw.pop("tower", "clip")
    src = write_llava(tmp_path / "src", shapes["tokenizer"], tower, **kw)
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    ours, tok, cfg = load_checkpoint(import_hf_llava(src, tmp_path / "ours"))
    assert ours.encoders["image"].feature_layer == hf.config.vision_feature_layer
    ids, mask, pixels = inputs(ours)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, media={"image": pixels})["logits"]
    torch.testing.assert_close(got, expected)

    with torch.no_grad():  # away from the imported weights, so the export cannot pass by copying the source
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf_llava(ours, tok, cfg, tmp_path / "hf")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "multimodal_projector_bias"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask, media={"image": pixels})["logits"]
        got = back(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected)


REFUSED = {
    "siglip-default": (
        dict(tower="siglip", vision_feature_select_strategy="default"),
        "a SigLIP Llava with strategy 'default' drops a patch token; mmalign keeps every patch",
    ),
    "layer-list": (
        dict(vision_feature_layer=[-2, -1]),
        "vision_feature_layer=[-2, -1]: only a single layer is supported",
    ),
    "relu-projector": (
        dict(projector_hidden_act="relu"),
        "projector_hidden_act='relu': only gelu maps to mlp2x_gelu",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_settings_mmalign_cannot_represent_are_refused_by_name(case, shapes, tmp_path):
    kw, message = REFUSED[case]
    kw = dict(kw)
    src = write_llava(tmp_path / "src", shapes["tokenizer"], kw.pop("tower", "clip"), **kw)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        import_hf_llava(src, tmp_path / "ours")


def test_a_tower_other_than_clip_or_siglip_is_refused(tmp_path):
    tower = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=tower, text_config=text)).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"^unsupported Llava vision tower 'dinov2'; supported: CLIP, SigLIP$"):
        import_hf_llava(tmp_path / "src", tmp_path / "ours")


def test_import_checks_the_image_token_id_of_the_model_it_builds(shapes, tmp_path, monkeypatch):
    import mmalign.interop.hf_llava as hf_llava

    build = hf_llava.build_model

    def build_with_moved_placeholder(cfg):  # as if mmalign's tokenizer put <image> elsewhere than Llava's
        model, tok = build(cfg)
        model.media_token_ids["image"] += 1
        return model, tok

    src = write_llava(tmp_path / "src", shapes["tokenizer"])
    llava_id = LlavaConfig.from_pretrained(src).image_token_id
    monkeypatch.setattr(hf_llava, "build_model", build_with_moved_placeholder)
    with pytest.raises(ValueError, match=f"^image token id {llava_id + 1} != Llava's {llava_id}$"):
        import_hf_llava(src, tmp_path / "ours")


def test_an_image_token_id_that_is_not_the_placeholder_is_refused(shapes, tmp_path):
    src = write_llava(tmp_path / "src", shapes["tokenizer"])
    cfg = LlavaConfig.from_pretrained(src)
    cfg.image_token_id = 5
    cfg.save_pretrained(src)
    with pytest.raises(ValueError, match="image token id 5 is"):
        import_hf_llava(src, tmp_path / "ours")


def test_export_refuses_models_llava_cannot_hold(shapes, tmp_path):
    from helpers import tiny_model_config
    from mmalign.models.builder import build_model

    cfg = tiny_model_config(shapes["tokenizer"], connector="linear")
    model, tok = build_model(cfg)
    with pytest.raises(ValueError, match="needs the mlp2x_gelu connector.*this model has linear"):
        export_hf_llava(model, tok, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    from test_flamingo import flamingo_config

    cfg = flamingo_config(shapes["tokenizer"])
    model, tok = build_model(cfg)
    with pytest.raises(ValueError, match=r"reading images only; this one is flamingo reading \['image'\]"):
        export_hf_llava(model, tok, cfg, tmp_path / "hf")

    from test_modalities import _two_tower_config

    cfg = _two_tower_config(shapes["tokenizer"], {})
    model, tok = build_model(cfg)
    with pytest.raises(ValueError, match="^hf-llava export needs a single CLIP or SigLIP tower; this model has Fused"):
        export_hf_llava(model, tok, cfg, tmp_path / "hf")

    not_ours = torch.nn.Linear(2, 2)  # e.g. a transformers model passed by mistake: named by its class
    with pytest.raises(ValueError, match=r"reading images only; this one is Linear reading \?$"):
        export_hf_llava(not_ours, tok, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_keeps_tied_embeddings_tied(shapes, tmp_path):
    from helpers import tiny_model_config
    from mmalign.models.builder import build_model

    cfg = tiny_model_config(shapes["tokenizer"])
    cfg.llm.config["tie_word_embeddings"] = True
    model, tok = build_model(cfg)
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    export_hf_llava(model, tok, cfg, tmp_path / "hf")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    # Tied in the file's config, so fine-tuning the exported model moves one matrix, as ours does.
    assert back.config.tie_word_embeddings
    assert back.get_output_embeddings().weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()
