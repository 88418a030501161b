"""Tiny fresh models for tests (built from configs, no files needed beyond a tokenizer)."""

from __future__ import annotations

from mmalign.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig

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
    return ModelConfig(
        encoder=EncoderConfig(name=family, config=dict(TINY_VISION)),
        connector=ConnectorConfig(name=connector),
        llm=LLMConfig(config=dict(TINY_LLAMA), tokenizer=str(tokenizer_dir)),
    )
