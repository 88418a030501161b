"""Tiny fresh models for tests (built from configs, no files needed beyond a tokenizer)."""

from __future__ import annotations

from mmalign.config import ConnectorConfig, EncoderConfig, LLMConfig, MediaConfig, ModelConfig

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_model_config(tokenizer_dir: str, connector: str = "mlp2x_gelu", family: str = "clip") -> ModelConfig:
    """A projector-family model reading images: a tiny `family` (clip | siglip) tower, `connector`, tiny Llama."""
    image = MediaConfig(
        encoder=EncoderConfig(name=family, config=dict(TINY_VISION)), connector=ConnectorConfig(connector)
    )
    return ModelConfig(media={"image": image}, llm=LLMConfig(config=dict(TINY_LLAMA), tokenizer=str(tokenizer_dir)))


def image_processor(tokenizer, *, tokens_per_image: int, image_size: int, template="chat", max_length=128):
    """A Processor reading images only, without a model: the encoder is a stand-in holding the preprocessing
    settings a vision tower would give."""
    from types import SimpleNamespace

    from mmalign.data.processor import MediaSpec, Processor

    encoder = SimpleNamespace(image_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = MediaSpec(
        modality="image",
        placeholder="<image>",
        token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tokens_per_item=tokens_per_image,
        encoder=encoder,
    )
    return Processor(tokenizer, media=[spec], template=template, max_length=max_length)


def stopped_at(step: int):
    """A context in which a Trainer run is interrupted (as by Ctrl-C) right after logging `step`."""
    import contextlib

    import pytest

    from mmalign.train.trainer import Trainer

    @contextlib.contextmanager
    def context():
        original = Trainer._log

        def crash(self, row):
            original(self, row)
            if row.get("step") == step:
                raise KeyboardInterrupt

        Trainer._log = crash
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            Trainer._log = original

    return context()


LLAVA_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32)


def write_llava(out, tokenizer_dir, tower="clip", **llava_kw):
    """A tiny random Llava with `tower` (clip | siglip) and the given LlavaConfig settings, saved to `out`."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(patch_size=8, **LLAVA_TOWER)
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"), **llava_kw
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-zero biases, so a dropped or misplaced bias changes the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
