"""Conversion to and from transformers' LlavaForConditionalGeneration.

Weights move module by module (vision tower, projector linears, decoder, LM head) with `load_state_dict`, so
a naming change inside transformers cannot silently drop a tensor: a mismatch raises.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmalign.config import ConnectorConfig, EncoderConfig, LLMConfig, MediaConfig, ModelConfig
from mmalign.modalities import get_modality
from mmalign.models.adapters import merged_copy
from mmalign.models.builder import build_model
from mmalign.models.connectors import MLPProjector
from mmalign.models.encoders import VisionEncoder, read_image_norm
from mmalign.models.llm import special_token_ids
from mmalign.models.multimodal import MultimodalLM
from mmalign.train.checkpoint import save_checkpoint

IMAGE_TOKEN = get_modality("image").placeholder


def _strategy(encoder: VisionEncoder) -> str:
    # Llava's "default" drops the first token; a SigLIP tower has no CLS to drop, so it must be "full".
    return "default" if encoder.has_cls and not encoder.keep_cls else "full"


def export_hf_llava(model: MultimodalLM, tokenizer, model_cfg: ModelConfig, out: str | Path):
    """Write `out` so that LlavaForConditionalGeneration.from_pretrained and AutoProcessor load it."""
    model = merged_copy(model)  # adapters folded into their base weights; the live model keeps them
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if getattr(model, "family", None) != "projector" or model.modalities != ["image"]:
        raise ValueError(
            f"hf-llava export takes a projector-family model reading images only; this one is "
            f"{getattr(model, 'family', type(model).__name__)} reading {getattr(model, 'modalities', '?')}"
        )
    connector, enc = model.connectors["image"], model.encoders["image"]
    if not isinstance(connector, MLPProjector) or connector.depth != 2:
        raise ValueError(
            f"hf-llava export needs the mlp2x_gelu connector (Llava's projector is Linear-GELU-Linear); "
            f"this model has {model_cfg.media['image'].connector.name}"
        )
    if not isinstance(enc, VisionEncoder):
        raise ValueError(f"hf-llava export needs a single CLIP or SigLIP tower; this model has {type(enc).__name__}")
    llm = model.llm
    config = LlavaConfig(
        vision_config=enc.tower.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.media_token_ids["image"],
        vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy=_strategy(enc),
        projector_hidden_act="gelu",
        multimodal_projector_bias=connector.linears[0].bias is not None,
        image_seq_length=enc.num_tokens,
    )  # tie_word_embeddings: LlavaConfig reads it from text_config
    hf = LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(enc.tower.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(connector.linears[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(connector.linears[1].state_dict())
    hf.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    for key, value in special_token_ids(tokenizer).items():  # so transformers' generate stops where ours does
        setattr(hf.generation_config, key, value)
    out = Path(out)
    hf.save_pretrained(out)
    size = enc.image_size
    image_processor = CLIPImageProcessor(  # resize straight to a square, no crop: as mmalign preprocesses
        size={"height": size, "width": size},
        do_center_crop=False,
        image_mean=list(enc.mean),
        image_std=list(enc.std),
        resample=3,  # bicubic, as mmalign preprocesses
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=enc.patch_size,
        vision_feature_select_strategy=_strategy(enc),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(enc.has_cls),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    return out


def import_hf_llava(src: str | Path, out: str | Path) -> Path:
    """Read a LlavaForConditionalGeneration folder into an mmalign checkpoint folder (self-contained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    src, out = Path(src), Path(out)
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    cfg = hf.config
    vision_type = cfg.vision_config.model_type
    if vision_type.startswith("clip"):
        family = "clip"
    elif vision_type.startswith("siglip"):
        family = "siglip"
    else:
        raise ValueError(f"unsupported Llava vision tower {vision_type!r}; supported: CLIP, SigLIP")
    if family == "siglip" and cfg.vision_feature_select_strategy == "default":
        raise ValueError("a SigLIP Llava with strategy 'default' drops a patch token; mmalign keeps every patch")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={cfg.vision_feature_layer}: only a single layer is supported")
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"projector_hidden_act={cfg.projector_hidden_act!r}: only gelu maps to mlp2x_gelu")

    tower_dir, llm_dir = out / "encoder", out / "llm"
    tower = hf.model.vision_tower
    norm = read_image_norm(src)
    tower.save_pretrained(tower_dir)
    (tower_dir / "mmalign_image.json").write_text(json.dumps({k: list(v) for k, v in norm.items()}))
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = AutoModelForCausalLM.from_config(cfg.text_config)
    text.get_decoder().load_state_dict(hf.model.language_model.state_dict())
    text.get_output_embeddings().load_state_dict(hf.lm_head.state_dict())
    text.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    keep_cls = family == "clip" and cfg.vision_feature_select_strategy == "full"
    if tokenizer.convert_ids_to_tokens(cfg.image_token_id) != IMAGE_TOKEN:
        raise ValueError(
            f"Llava's image token id {cfg.image_token_id} is {tokenizer.convert_ids_to_tokens(cfg.image_token_id)!r}"
            f" in its tokenizer; mmalign's image placeholder is {IMAGE_TOKEN!r}"
        )
    encoder = EncoderConfig(name=family, path=str(tower_dir), feature_layer=cfg.vision_feature_layer, keep_cls=keep_cls)
    model_cfg = ModelConfig(
        family="projector",
        media={
            "image": MediaConfig(
                encoder=encoder, connector=ConnectorConfig(name="mlp2x_gelu", bias=cfg.multimodal_projector_bias)
            )
        },
        llm=LLMConfig(path=str(llm_dir)),
    )
    model, tokenizer = build_model(model_cfg)
    if model.media_token_ids["image"] != cfg.image_token_id:
        raise ValueError(f"image token id {model.media_token_ids['image']} != Llava's {cfg.image_token_id}")
    proj, connector = hf.model.multi_modal_projector, model.connectors["image"]
    connector.linears[0].load_state_dict(proj.linear_1.state_dict())
    connector.linears[1].load_state_dict(proj.linear_2.state_dict())
    save_checkpoint(out, model, tokenizer, model_cfg)
    return out
