"""AdamW over the trainable groups and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmalign.config import TrainConfig
from mmalign.train.freeze import group_of


def build_optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay only on >= 2-D weights (never biases, norms, gates or temperatures); the connector
    groups may have their own learning rate (LLaVA's mm_projector_lr)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"no trainable parameters (train.trainable={cfg.trainable})")
    groups = group_of(model)
    is_connector = [groups.get(n, "").split(".")[0] == "connector" for n, _ in trainable]
    connector = [p for (_, p), c in zip(trainable, is_connector, strict=True) if c]
    rest = [p for (_, p), c in zip(trainable, is_connector, strict=True) if not c]
    param_groups = []
    for params, lr in ((connector, cfg.connector_lr or cfg.lr), (rest, cfg.lr)):
        param_groups += [g | {"lr": lr} for g in decay_groups(params, cfg.weight_decay) if g["params"]]
    return param_groups


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on >= 2-D weights, none on biases, norms, temperatures and other 1-D scalars."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float = 0.0):
    """Multiplier on the base lr: linear warm-up then cosine decay to `min_ratio`."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
