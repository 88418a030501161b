"""LoRA and DoRA adapters through PEFT, on explicit module names.

Targets are resolved here, from the parts of the model that train, into full module names (`llm.model.layers.3.
self_attn.q_proj`), and PEFT is handed exactly that list: a bare `q_proj` matched by suffix could otherwise land in
a frozen encoder that happens to use the same names. The checkpoint records the list, so reloading injects the same
adapters without resolving again.
"""

from __future__ import annotations

from copy import deepcopy

from torch import nn

from mmalign.config import ConfigError, LoraConfig
from mmalign.models.layers import select

ALL_LINEAR = "all-linear"


def resolve_targets(model: nn.Module, trainable: list[str], lora: LoraConfig) -> list[str]:
    """Full names of the Linear modules that get adapters: inside what `trainable` selects (groups or layer
    ranges), only in `lora.groups`, with a last name part in `lora.targets` (or any Linear for all-linear). The
    LM head never gets one (it may be tied to the input embeddings)."""
    adapted = select(model, list(lora.groups), "train.lora.groups")
    chosen = [m for group, modules in select(model, trainable).items() if group in adapted for m in modules]
    names = {id(m): n for n, m in model.named_modules()}
    head = getattr(model, "lm_head", None)
    out: list[str] = []
    for root in chosen:
        for sub in root.modules():
            if not isinstance(sub, nn.Linear) or sub is head:
                continue
            name = names[id(sub)]
            if (ALL_LINEAR in lora.targets or name.rsplit(".", 1)[-1] in lora.targets) and name not in out:
                out.append(name)
    if not out:
        raise ConfigError(
            f"train.lora.targets={lora.targets} match no Linear module in the trained parts of "
            f"train.lora.groups={lora.groups} (train.trainable selects which parts train)"
        )
    return out


def inject_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Add adapters, in place, to exactly `lora.modules`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if not lora.modules:
        raise ConfigError("model.lora.modules is empty: training resolves and records the adapted modules")
    missing = sorted(set(lora.modules) - {n for n, _ in model.named_modules()})
    if missing:
        raise ConfigError(f"model.lora.modules names {len(missing)} modules this model lacks, e.g. {missing[:3]}")
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.modules),  # full names from the root: a suffix match can only hit that module
        use_dora=lora.dora,
        bias="none",
    )
    return inject_adapter_in_model(config, model)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place): the exported model is the
    adapted model with no PEFT modules left. Weights tied to a merged one stay tied (they share the tensor)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy with the adapters merged; the trained model keeps its adapters."""
    return merge_adapters(deepcopy(model)) if has_adapters(model) else model
