"""A multimodal classifier: any set of encoders, a fusion module, a trunk and one head per task. A task classifies,
regresses or retrieves (`mmalign.fusion.tasks`); only its head's width depends on which.

Sharing between tasks (multi-task learning):
- hard: one tower (encoders + fusion + trunk) shared by every task, a head per task. Each task's head reads the
  trunk at its own `level`, so lower-level tasks can be supervised lower down (hierarchical multi-task learning).
- soft: one tower per task, pulled together by a penalty on the squared distance of each parameter to its mean
  over the towers (Duong et al. 2015's L2 soft sharing).
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from mmalign.fusion.config import ClassifierModelConfig
from mmalign.fusion.modules import build_fusion
from mmalign.fusion.tasks import TaskSpec


class Block(nn.Module):
    """A pre-norm residual MLP: one level of the trunk."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def build_encoders(cfg: ClassifierModelConfig) -> nn.ModuleDict:
    from mmalign.config import MediaConfig
    from mmalign.models.builder import build_encoder

    return nn.ModuleDict({m: build_encoder(MediaConfig(encoder=enc), m) for m, enc in sorted(cfg.encoders.items())})


class Tower(nn.Module):
    """Encoders -> mean-pooled features -> fusion -> trunk; returns the fused vector and every level's output."""

    def __init__(self, cfg: ClassifierModelConfig):
        super().__init__()
        self.encoders = build_encoders(cfg)
        dims = {m: enc.hidden_size for m, enc in self.encoders.items()}
        self.fusion = build_fusion(cfg.fusion.name, dims, cfg.fusion.dim, **cfg.fusion.settings)
        self.trunk = nn.ModuleList(Block(cfg.fusion.dim) for _ in range(cfg.trunk_depth))

    def forward(self, media: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        features = {m: self.encoders[m](x).mean(dim=1) for m, x in media.items() if m in self.encoders}
        levels = [self.fusion(features, present)]
        for block in self.trunk:
            levels.append(block(levels[-1]))
        return levels


class MultimodalClassifier(nn.Module):
    """`forward(media, present) -> {"outputs": {task: (B, head width)}, "shared": fused vector or None}`."""

    def __init__(self, cfg: ClassifierModelConfig, specs: dict[str, TaskSpec]):
        super().__init__()
        self.cfg, self.specs = cfg, specs
        self.tasks = sorted(specs)
        depth = cfg.trunk_depth
        self.levels = {}
        for t in self.tasks:
            level = cfg.tasks[t].level if t in cfg.tasks else -1
            if not -depth - 1 <= level <= depth:
                raise ValueError(f"task {t}: level {level} is outside the trunk (0 = fusion output ... {depth})")
            self.levels[t] = level % (depth + 1)
        if cfg.sharing == "hard":
            self.tower = Tower(cfg)
        else:
            first = Tower(cfg)  # every tower starts from the same weights, so the penalty starts at zero
            self.towers = nn.ModuleDict({t: deepcopy(first) for t in self.tasks})
        dim = cfg.fusion.dim
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, s.out_dim(dim)))
                for t, s in specs.items()
            }  # fmt: skip
        )

    @property
    def modalities(self) -> list[str]:
        return sorted(self.cfg.encoders)

    def encoder(self, modality: str) -> nn.Module:
        tower = self.tower if self.cfg.sharing == "hard" else next(iter(self.towers.values()))
        return tower.encoders[modality]

    def forward(self, media, present, tasks: list[str] | None = None) -> dict:
        tasks = tasks or self.tasks
        if self.cfg.sharing == "hard":
            levels = self.tower(media, present)
            outputs = {t: self.heads[t](levels[self.levels[t]]) for t in tasks}
            return {"outputs": outputs, "shared": levels[0]}
        outputs = {t: self.heads[t](self.towers[t](media, present)[self.levels[t]]) for t in tasks}
        return {"outputs": outputs, "shared": None}

    def penalty(self) -> torch.Tensor:
        """Soft sharing: sum over parameters of the squared distance of each tower's copy to the towers' mean."""
        if self.cfg.sharing == "hard" or len(self.tasks) < 2:
            return torch.zeros(())
        towers = [dict(self.towers[t].named_parameters()) for t in self.tasks]
        total = 0.0
        for name in towers[0]:
            stacked = torch.stack([tw[name] for tw in towers])
            total = total + ((stacked - stacked.mean(dim=0)) ** 2).sum()
        return total


def modality_dropout(present: dict[str, torch.Tensor], p: float, generator: torch.Generator) -> dict:
    """Drop each present modality of each sample with chance p, never all of a sample's modalities."""
    if p <= 0 or len(present) < 2:
        return present
    names = sorted(present)
    keep = torch.stack([present[m] for m in names], dim=1)
    drop = (torch.rand(keep.shape, generator=generator) < p).to(keep.device)
    kept = keep & ~drop
    lost = kept.sum(dim=1) == 0  # restore the originals of samples that would have lost everything
    kept[lost] = keep[lost]
    return {m: kept[:, i] for i, m in enumerate(names)}
