"""Which parameters train: decided once, by the model's declared groups, before the optimizer is built."""

from __future__ import annotations

from torch import nn

from mmalign.config import ConfigError


def select_groups(model: nn.Module, names: list[str]) -> list[str]:
    """The declared groups that `names` select: a name selects every group it equals or is a dotted prefix of
    (`encoder` selects `encoder.image` and `encoder.audio`). A name that selects nothing is an error."""
    groups = list(model.param_groups())
    picked: list[str] = []
    for name in names:
        hits = [g for g in groups if g == name or g.startswith(name + ".")]
        if not hits:
            raise ConfigError(f"train.trainable names {name!r}, which selects no group; this model's groups: {groups}")
        picked += [g for g in hits if g not in picked]
    return picked


def group_of(model: nn.Module) -> dict[str, str]:
    """{parameter name: its group} for every parameter (tied weights under their first name)."""
    by_id = {id(p): group for group, module in model.param_groups().items() for p in module.parameters()}
    return {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}


def set_trainable(model: nn.Module, trainable: list[str], finetune: str = "full") -> None:
    """Freeze everything, then unfreeze the selected groups. With finetune=lora the LLM trains only its adapters
    (the LLM must already be wrapped by PEFT)."""
    groups = model.param_groups()
    model.requires_grad_(False)
    for group in select_groups(model, trainable):
        module = groups[group]
        if group == "llm" and finetune == "lora":
            for name, p in module.named_parameters():
                p.requires_grad = "lora_" in name
        else:
            module.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{group: (trainable, total)}: the table every run prints."""
    out = {}
    for group, module in model.param_groups().items():
        params = list(module.parameters())
        out[group] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out
