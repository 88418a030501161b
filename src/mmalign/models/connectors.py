"""Connectors that map encoder features into the LLM's embedding space (LLaVA family: early fusion).

Each is registered by name; `mlpNx_gelu` names are parsed, so `mlp3x_gelu` needs no new code.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mmalign.registry import CONNECTORS


class MLPProjector(nn.Module):
    """Linear -> (GELU -> Linear) x (depth - 1). depth=1 is LLaVA-1's linear projector, depth=2 LLaVA-1.5's."""

    fusion = "early"  # splices tokens into the embedding sequence (vs "deep": wraps decoder layers)

    def __init__(self, *, in_dim: int, out_dim: int, depth: int = 2, bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"connector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
        self.layers = nn.Sequential(*layers)
        self.depth = depth

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(images, tokens, in_dim) -> (images, tokens, out_dim)."""
        return self.layers(features)

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]


@CONNECTORS.register("linear")
def linear(*, in_dim: int, out_dim: int, bias: bool = True) -> MLPProjector:
    return MLPProjector(in_dim=in_dim, out_dim=out_dim, depth=1, bias=bias)


def _match_mlp(name: str) -> dict | None:
    m = re.fullmatch(r"mlp(\d+)x_gelu", name)
    return {"depth": int(m.group(1))} if m else None


@CONNECTORS.register_pattern(_match_mlp)
def mlp_gelu(*, depth: int, in_dim: int, out_dim: int, bias: bool = True) -> MLPProjector:
    return MLPProjector(in_dim=in_dim, out_dim=out_dim, depth=depth, bias=bias)


class FusingConnector(nn.Module):
    """For a modality read by several encoders (`extra_encoders`): a fusion module of `mmalign.fusion` combines
    the encoders' features token by token, then a projector maps the fused vector into the LLM.

    The fused encoder hands over its features concatenated per token, (items, tokens, Σ D_i); this splits them back
    into the encoders' parts, fuses each token's parts as one sample (every part present), and projects. The fusion
    lives here rather than in the encoder so that it trains with the connector while the encoders stay frozen.
    """

    fusion = "early"  # like MLPProjector: splices tokens into the embedding sequence

    def __init__(self, *, parts: list[int], projector: str, out_dim: int, bias: bool = True, name: str = "concat",
                 dim: int = 256, settings: dict | None = None):  # fmt: skip
        from mmalign.fusion.modules import build_fusion

        super().__init__()
        if len(parts) < 2:
            raise ValueError(f"a fusing connector needs the features of 2+ encoders, got parts {parts}")
        self.parts = list(parts)
        self.names = [f"encoder{i:02d}" for i in range(len(parts))]  # sorted order = encoder order
        self.fusion_module = build_fusion(name, dict(zip(self.names, parts, strict=True)), dim, **(settings or {}))
        self.projector = CONNECTORS.build(projector, in_dim=dim, out_dim=out_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(items, tokens, Σ parts) -> (items, tokens, out_dim)."""
        items, tokens, _ = features.shape
        flat = features.reshape(items * tokens, -1).split(self.parts, dim=-1)
        present = torch.ones(items * tokens, dtype=torch.bool, device=features.device)
        fused = self.fusion_module(dict(zip(self.names, flat, strict=True)), dict.fromkeys(self.names, present))
        return self.projector(fused.view(items, tokens, -1))
