"""`build_model(config)`: the one place a ModelConfig becomes modules."""

from __future__ import annotations

from torch import nn

from mmalign.config import ModelConfig
from mmalign.models import connectors as _connectors  # noqa: F401  (registers connectors)
from mmalign.models import encoders as _encoders  # noqa: F401  (registers encoders)
from mmalign.models.llm import load_llm, load_tokenizer
from mmalign.models.multimodal import MultimodalLM
from mmalign.registry import CONNECTORS, ENCODERS

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Logit transforms some LLMs apply after the LM head; the sparse-loss path calls the head directly.
UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_llm(llm: nn.Module) -> None:
    for name in UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(llm.config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"LLM config sets {name}={value}; mmalign does not apply it yet")


def apply_lora(llm: nn.Module, lora: dict) -> nn.Module:
    """Wrap the LLM (only the LLM: the encoder never gets adapters) with PEFT LoRA."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.get("r", 16),
        lora_alpha=lora.get("alpha", 32),
        lora_dropout=lora.get("dropout", 0.05),
        target_modules=list(lora.get("targets", DEFAULT_LORA_TARGETS)),
        bias="none",
    )
    return get_peft_model(llm, config)


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[MultimodalLM, object]:
    """Returns (model, tokenizer). Weights come from the configured paths or fresh initialisation."""
    tokenizer = tokenizer or load_tokenizer(cfg.llm, cfg.image_token)
    enc = cfg.encoder
    encoder = ENCODERS.build(
        enc.name,
        path=enc.path,
        preset=enc.preset,
        config=enc.config,
        feature_layer=enc.feature_layer,
        keep_cls=enc.keep_cls,
    )
    llm = load_llm(cfg.llm, vocab_size=len(tokenizer))
    check_llm(llm)
    hidden = llm.get_input_embeddings().embedding_dim
    connector = CONNECTORS.build(
        cfg.connector.name, in_dim=encoder.hidden_size, out_dim=hidden, bias=cfg.connector.bias
    )
    if cfg.lora:
        llm = apply_lora(llm, cfg.lora)
    image_token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    model = MultimodalLM(encoder=encoder, connector=connector, llm=llm, image_token_id=image_token_id)
    return model, tokenizer
