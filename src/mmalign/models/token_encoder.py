"""The projector family's default encoder for modalities without a pretrained tower: the modality's own onellm
tokenizer followed by a small Transformer, trained from scratch with the connector. It gives the projector family
one encoder per modality where the onellm family shares one universal encoder, so the two compare on the same
tokens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mmalign.modalities import get_modality
from mmalign.registry import register_encoder


class TokenEncoder(nn.Module):
    """(items, ...) preprocessed inputs -> (items, num_tokens, dim). Preprocessing settings (`num_frames`, `size`,
    ...) are the tokenizer's and read through this module, as the processor reads any encoder's."""

    def __init__(self, modality: str, *, dim: int = 64, depth: int = 2, heads: int = 4, tokenizer: dict | None = None):
        super().__init__()
        spec = get_modality(modality)
        if spec.tokenizer is None:
            raise ValueError(f"the {modality} modality registers no tokenizer for a token encoder to wrap")
        self.settings = dict(modality=modality, dim=dim, depth=depth, heads=heads, tokenizer=dict(tokenizer or {}))
        self.tokenizer = spec.tokenizer(SimpleNamespace(hidden_size=dim), dict(tokenizer or {}))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.hidden_size, self.num_tokens = dim, self.tokenizer.num_tokens

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["tokenizer"], name)  # the preprocessing settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.tokenizer(x)))

    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "token_encoder.json").write_text(json.dumps(self.settings))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / "model.safetensors")


@register_encoder("modality-transformer")
def token_encoder(*, modality: str, path=None, preset=None, config=None, **_) -> TokenEncoder:
    """From a folder written by `TokenEncoder.save`, or fresh: `config` takes dim, depth, heads and tokenizer
    (the modality tokenizer's settings)."""
    if preset:
        raise ValueError(f"the modality-transformer encoder has no presets (got {preset!r}); set `config` keys")
    if path:
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "token_encoder.json").is_file():
            raise FileNotFoundError(f"{folder} holds no token_encoder.json (written by TokenEncoder.save)")
        settings = json.loads((folder / "token_encoder.json").read_text())
        if settings["modality"] != modality:
            raise ValueError(f"{folder} holds a {settings['modality']} encoder, not a {modality} one")
        encoder = TokenEncoder(**settings)
        encoder.load_state_dict(load_file(str(folder / "model.safetensors")))
        return encoder
    return TokenEncoder(modality, **(config or {}))
