"""FSDP2 (`fully_shard`): each rank keeps 1/N of every parameter, its gradient and its optimizer state, and gathers
a block's full weights only while that block runs. The units are the blocks of each group's stack (LLM layers,
encoder layers), then the model itself for what is left (embeddings, connectors, norms, head).

Checkpoints stay full, unsharded, and the same files a single process writes: weights are gathered for the save,
optimizer state is saved keyed by parameter name, and a resumed run loads weights before sharding them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmalign.models.layers import stack_blocks


def shard_model(model: nn.Module) -> str:
    """Shard every stack block, then the model; the model's forward gathers and frees blocks as they run. Returns a
    line saying how much of the model this rank holds."""
    from torch.distributed.fsdp import fully_shard

    for block in stack_blocks(model):
        fully_shard(block)
    fully_shard(model)
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"FSDP2: {len(units(model))} sharded units; this rank holds {held:,} of {total:,} parameter values"


def units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every unit's full weights in place of its shards (read-only: writes are not scattered back). A collective:
    every rank enters it."""
    sharded = units(model)
    for unit in sharded:
        unit.unshard()
    try:
        yield
    finally:
        for unit in sharded:
            unit.reshard()


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Off for all but the last micro-batch of a step: gradients accumulate locally and are reduced once."""
    model.set_requires_gradient_sync(sync)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name (on rank 0; empty elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a full, name-keyed optimizer state (as `optimizer_state` wrote it) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
