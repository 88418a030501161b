"""All-gather that lets gradients flow back to the rank that owns each row, for contrastive losses whose negatives
come from the whole global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on GPUs, gloo on CPU. Returns (rank, world)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def average_gradients(params) -> None:
    """Mean of every gradient over ranks, as DDP would do (all ranks must call it with the same parameters)."""
    _, world = rank_and_world()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather the (B, ...) rows of every rank into (world * B, ...), ordered by rank.

    Backward: every rank's loss depends on every rank's rows, so the gradient of row k is the sum over ranks of
    d loss_rank / d gathered[k]. An all_reduce(sum) of the gathered gradient followed by taking this rank's slice
    gives exactly that (a reduce_scatter would too, but gloo does not implement it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; never modify autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) local rows -> (world * B, D) rows of all ranks, rank r's rows at [r * B, (r + 1) * B).

    Gradients flow back to the owning rank, summed over every rank's loss. Every rank must pass the same B and must
    run backward (the backward is a collective). Without an initialised process group (or world size 1) this is the
    identity.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)
