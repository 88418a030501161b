"""The LLM side: any Hugging Face causal LM and its tokenizer, from a folder or from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmalign.config import LLMConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: LLMConfig, image_token: str):
    """The LLM's tokenizer, with the image placeholder and a pad token guaranteed to exist."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if not source:
        raise ValueError("set llm.tokenizer (or llm.path) to a tokenizer folder")
    if not Path(source).exists():
        raise FileNotFoundError(f"tokenizer folder {source} does not exist")
    tok = AutoTokenizer.from_pretrained(source)
    if image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    if tok.pad_token is None:
        # Padding is always masked (attention and labels), so eos can serve without growing the vocabulary.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_llm(cfg: LLMConfig, vocab_size: int) -> nn.Module:
    """AutoModelForCausalLM from `cfg.path`, or fresh from `cfg.config`; embeddings grown to fit the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"llm path {cfg.path} does not exist")
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    else:
        options = dict(cfg.config)
        if "model_type" not in options:
            raise ValueError("llm.config needs a model_type (e.g. llama) when llm.path is not set")
        options.setdefault("vocab_size", vocab_size)
        hf_config = AutoConfig.for_model(options.pop("model_type"), **options)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
