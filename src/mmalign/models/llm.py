"""The LLM side: any Hugging Face causal LM and its tokenizer, from a folder or from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmalign.config import ConfigError, LLMConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: LLMConfig, placeholders: list[str]):
    """The LLM's tokenizer, with the media placeholders (`<image>`, ...) and a pad token guaranteed to exist."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if not source:
        raise ValueError("set llm.tokenizer (or llm.path) to a tokenizer folder")
    if not Path(source).exists():
        raise FileNotFoundError(f"tokenizer folder {source} does not exist")
    tok = AutoTokenizer.from_pretrained(source)
    missing = [p for p in placeholders if p not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        # Padding is always masked (attention and labels), so eos can serve without growing the vocabulary.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def special_token_ids(tokenizer) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def four_bit_config():
    """NF4 weights with bf16 compute and double quantisation (the QLoRA recipe), or a clear error where
    bitsandbytes cannot run."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.finetune=qlora needs bitsandbytes: pip install 'mmalign[qlora]' (on a CUDA machine)")
    if not torch.cuda.is_available():
        raise ConfigError("train.finetune=qlora needs a CUDA GPU for 4-bit weights; this machine has none")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_llm(cfg: LLMConfig, tokenizer) -> nn.Module:
    """AutoModelForCausalLM from `cfg.path`, or fresh from `cfg.config`; embeddings grown to fit the tokenizer.

    The model's config and generation config carry the tokenizer's bos/eos/pad ids, so every saved or exported
    copy stops where mmalign's own generation stops (a fresh config would otherwise keep its family's defaults)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"llm path {cfg.path} does not exist")
        quantized = {"quantization_config": four_bit_config()} if cfg.quantize == "nf4" else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **quantized)
    else:
        if cfg.quantize != "none":
            raise ConfigError("model.llm.quantize=nf4 quantises pretrained weights: set model.llm.path")
        options = dict(cfg.config)
        if "model_type" not in options:
            raise ValueError("llm.config needs a model_type (e.g. llama) when llm.path is not set")
        options.setdefault("vocab_size", len(tokenizer))
        hf_config = AutoConfig.for_model(options.pop("model_type"), **options)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    for key, value in special_token_ids(tokenizer).items():
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)
    return model
