"""AdamW over the trainable groups and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmalign.config import ConfigError, TrainConfig
from mmalign.models.layers import depths, under
from mmalign.train.freeze import group_of


def group_lrs(cfg: TrainConfig) -> dict[str, float]:
    """{group or prefix: peak lr}; `connector_lr` is shorthand for the connector entry."""
    lrs = {"connector": cfg.connector_lr} if cfg.connector_lr else {}
    return lrs | dict(cfg.group_lr)


def lr_for(group: str, lrs: dict[str, float], default: float) -> float:
    """The learning rate of the longest name in `lrs` that equals `group` or is a dotted prefix of it."""
    hits = [name for name in lrs if under(group, name)]
    return lrs[max(hits, key=len)] if hits else default


def build_optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups over the trainable parameters: a peak lr per declared group (`group_lr`), scaled by layer-wise
    decay inside each group (the layer order freezing reads too), and weight decay only on >= 2-D weights (never
    biases, norms, gates or temperatures). Each group carries `group` and `depth` for the printed table."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"no trainable parameters (train.trainable={cfg.trainable})")
    groups = group_of(model)
    modules = model.param_groups()
    levels = {g: depths(m) for g, m in modules.items()} if cfg.layer_decay != 1.0 else {}
    lrs = group_lrs(cfg)
    unknown = [name for name in lrs if not any(under(g, name) for g in modules)]
    if unknown:
        raise ConfigError(
            f"train.group_lr names {unknown}, which select no group; this model's groups: {list(modules)}"
        )
    buckets: dict[tuple, list] = {}
    for name, p in trainable:
        group = groups.get(name, "")
        depth, top = 0, 0
        if group in levels:
            depth, top = levels[group][0].get(id(p), 0), levels[group][1]
        lr = lr_for(group, lrs, cfg.lr) * cfg.layer_decay ** (top - depth)
        decay = cfg.weight_decay if p.ndim >= 2 else 0.0
        buckets.setdefault((group, depth, lr, decay), []).append(p)
    return [
        {"params": params, "lr": lr, "weight_decay": decay, "group": group, "depth": depth}
        for (group, depth, lr, decay), params in buckets.items()
    ]


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
