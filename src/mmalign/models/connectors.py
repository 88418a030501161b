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
