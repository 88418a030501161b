"""Perceiver Resampler (Flamingo, Alayrac et al. 2022, section 2.1): any number of encoder features in, a fixed
number of learned latents out.

Each layer lets the latents attend to the concatenation of the media features and the latents themselves (the
paper found this slightly better than attending to the features alone), then runs a feed-forward; both are
residual. Frames of a video item get a learned time embedding each before they are flattened together, so a
burst of frames becomes one media item. The IDEFICS variant (ReLU feed-forward, layer-normed queries and keys) is
a pair of options here, not a second module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def feed_forward(dim: int, mult: int, activation: str, norm: nn.Module | None = None, inner: int = 0) -> nn.Sequential:
    """Pre-norm MLP without biases: norm -> Linear(dim, inner) -> activation -> Linear(inner, dim).

    The norm defaults to LayerNorm and the inner width to `mult * dim`."""
    inner = inner or mult * dim
    return nn.Sequential(
        norm if norm is not None else nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        ACTIVATIONS[activation](),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to [features; latents] (keys and values)."""

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * dh) -> (B, heads, N, dh)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features (B, N, D), latents (B, L, D) -> (B, L, D)."""
        latents = self.norm_latents(latents)
        context = torch.cat([self.norm_media(features), latents], dim=1)  # (B, N + L, D)
        q = self.q_norm(self._split(self.to_q(latents)))  # (B, h, L, dh)
        k = self.k_norm(self._split(self.to_k(context)))  # (B, h, N + L, dh)
        v = self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, dh)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """(items, tokens, in_dim) or (items, frames, tokens, in_dim) -> (items, num_latents, out_dim).

    The latents live in the encoder's width (as in both anchors); a linear map to `out_dim` follows only when the
    two differ, so several modalities can share the cross-attention blocks' media width."""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int | None = None,
        num_latents: int = 64,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_frames: int = 1,
        activation: str = "gelu",
        qk_norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"resampler activation {activation!r}: choose one of {sorted(ACTIVATIONS)}")
        self.num_latents = num_latents
        self.max_frames = max_frames
        self.latents = nn.Parameter(torch.randn(num_latents, in_dim) * 0.02)
        # One learned embedding per frame; a single image (frames = 1) gets none, like the released checkpoints.
        self.frame_embeddings = nn.Parameter(torch.zeros(max_frames, in_dim)) if max_frames > 1 else None
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(in_dim, heads, dim_head, qk_norm), feed_forward(in_dim, ff_mult, activation)]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(in_dim)
        out_dim = out_dim or in_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=False) if out_dim != in_dim else nn.Identity()
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            features = features.unsqueeze(1)  # (items, 1, tokens, D)
        items, frames = features.shape[:2]
        if frames > 1:
            if self.frame_embeddings is None or frames > self.max_frames:
                raise ValueError(
                    f"{frames} frames per item, but this resampler has time embeddings for {self.max_frames} "
                    "(model.flamingo.max_frames)"
                )
            features = features + self.frame_embeddings[:frames, None].to(features.dtype)  # (frames, 1, D) broadcast
        features = features.flatten(1, 2)  # (items, frames * tokens, D)
        latents = self.latents.to(features.dtype).expand(items, -1, -1)  # (items, L, D)
        for attention, ff in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + ff(latents)
        return self.proj(self.norm(latents))
