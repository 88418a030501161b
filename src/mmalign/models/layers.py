"""Selectors over a model's declared groups and the layer order inside them: the one definition that freezing,
layer-wise learning-rate decay and LoRA targets all read.

A selector is a group name or dotted prefix (`llm`, `encoder`, `encoder.image`), optionally with a layer range in
Python slice syntax: `llm.layers[-4:]`, `encoder.image.layers[:6]`, `llm.layers[3]`. `layers` names a group's
stack of blocks whatever the attribute is called inside it (`layers`, `h`, `blocks`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmalign.config import ConfigError

_SELECTOR = re.compile(r"^(?P<group>[A-Za-z_][\w.]*?)(?:\.layers\[(?P<index>[^\]]*)\])?$")


def under(group: str, name: str) -> bool:
    """Whether `name` selects `group`: equal to it or a dotted prefix of it (`encoder` selects `encoder.image`)."""
    return group == name or group.startswith(name + ".")


@dataclass(frozen=True)
class Selector:
    text: str
    group: str  # a group name or dotted prefix
    layers: slice | None  # None: the whole group

    def picks(self, group: str) -> bool:
        return under(group, self.group)


def parse_selector(text: str, key: str = "train.trainable") -> Selector:
    match = _SELECTOR.match(text.strip())
    if not match:
        raise ConfigError(f"{key}: {text!r} is not a group or group.layers[range] (e.g. llm, llm.layers[-4:])")
    index = match["index"]
    if index is None:
        return Selector(text, match["group"], None)
    try:
        parts = [int(p) if p.strip() else None for p in index.split(":")]
    except ValueError:
        raise ConfigError(f"{key}: {text!r} has a layer range that is not integers ({index!r})") from None
    if len(parts) == 1:
        layers = slice(parts[0], None if parts[0] == -1 else parts[0] + 1)
    elif len(parts) in (2, 3):
        layers = slice(*parts)
    else:
        raise ConfigError(f"{key}: {text!r} has a malformed layer range {index!r}")
    return Selector(text, match["group"], layers)


def layer_stack(module: nn.Module) -> nn.ModuleList | None:
    """A group's stack of blocks: the ModuleList of one block class holding the most parameters (a decoder's
    layers, a vision tower's encoder layers). None when the group has no such stack (a projector)."""
    best, best_size = None, 0
    for child in module.modules():
        blocks = isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1
        # a list of bare layers (a projector's Linears) is one level, not a stack of blocks
        if blocks and all(any(True for _ in m.children()) for m in child):
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best, best_size = child, size
    return best


def stack_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every declared group's stack (LLM layers, encoder layers), in group order: the units that
    activation checkpointing and FSDP work on."""
    stacks = [layer_stack(module) for module in model.param_groups().values()]
    return [block for stack in stacks if stack is not None for block in stack]


def depths(module: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): depth}, deepest) in input-to-output order: 0 for parameters registered before the stack
    (embeddings, stem), i + 1 inside block i, L + 1 after it (final norm, head). A group without a stack is one
    level, depth 0 of 0."""
    stack = layer_stack(module)
    if stack is None:
        return {id(p): 0 for p in module.parameters()}, 0
    inside = {id(p): i + 1 for i, block in enumerate(stack) for p in block.parameters()}
    out, after = {}, False
    for p in module.parameters():
        if id(p) in inside:
            out[id(p)], after = inside[id(p)], True
        else:
            out[id(p)] = len(stack) + 1 if after else 0
    return out, len(stack) + 1


def selected_modules(model: nn.Module, selector: Selector, key: str = "train.trainable") -> dict[str, list[nn.Module]]:
    """{group: the modules a selector picks in it}: the whole group, or the blocks of its layer range."""
    groups = model.param_groups()
    hits = [g for g in groups if selector.picks(g)]
    if not hits:
        raise ConfigError(f"{key} names {selector.text!r}, which selects no group; this model's groups: {list(groups)}")
    out = {}
    for group in hits:
        if selector.layers is None:
            out[group] = [groups[group]]
            continue
        stack = layer_stack(groups[group])
        if stack is None:
            raise ConfigError(f"{key}: {selector.text!r}: group {group} has no stack of layers to take a range of")
        blocks = list(stack)[selector.layers]
        if not blocks:
            raise ConfigError(f"{key}: {selector.text!r} selects none of {group}'s {len(stack)} layers")
        out[group] = blocks
    return out


def select(model: nn.Module, selectors: list[str], key: str = "train.trainable") -> dict[str, list[nn.Module]]:
    """{group: selected modules} for a list of selectors, merged over selectors."""
    out: dict[str, list[nn.Module]] = {}
    for text in selectors:
        for group, modules in selected_modules(model, parse_selector(text, key), key).items():
            known = out.setdefault(group, [])
            known += [m for m in modules if all(m is not k for k in known)]
    return out


# ---------------------------------------------------------------- activation checkpointing
_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """`cls` whose forward keeps no activations in training: backward runs it again. A subclass rather than a
    wrapper module, so parameter names, checkpoints and selectors see the same model."""
    if cls not in _CHECKPOINTED:

        def forward(self, *args, **kwargs):
            if not (self.training and torch.is_grad_enabled()):
                return cls.forward(self, *args, **kwargs)
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return _CHECKPOINTED[cls]


def checkpoint_stacks(model: nn.Module) -> int:
    """Turn on activation checkpointing for every block of every group's stack; returns how many blocks."""
    n = 0
    for block in stack_blocks(model):
        if type(block) not in _CHECKPOINTED.values():
            block.__class__ = _checkpointed(type(block))
            n += 1
    return n
