"""Gradient accumulation that keeps the whole effective batch as negatives (GradCache, Gao et al. 2021).

Plain accumulation computes the contrastive loss per micro-batch, so each sees only its own negatives. Here:
1. embed every micro-batch without gradients and cache the embeddings;
2. compute the loss over all cached embeddings at once and take its gradient w.r.t. the embeddings;
3. re-embed each micro-batch with gradients and backpropagate the cached embedding gradient through it.
Parameter gradients equal one big-batch step, at the memory of one micro-batch (plus the embeddings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def cached_contrastive_step(
    embed_a: Callable[[torch.Tensor], torch.Tensor],
    embed_b: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs_a: torch.Tensor,
    inputs_b: torch.Tensor,
    micro_batch: int,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of `loss_fn(embed_a(inputs_a), embed_b(inputs_b))` over the full batch,
    running the towers `micro_batch` rows at a time. Returns the (detached) loss. The towers must be deterministic
    between the two passes (no dropout, or the same RNG state), as with any recomputation."""
    chunks_a, chunks_b = inputs_a.split(micro_batch), inputs_b.split(micro_batch)
    with torch.no_grad():
        cache_a = torch.cat([embed_a(x) for x in chunks_a])  # (N, E)
        cache_b = torch.cat([embed_b(x) for x in chunks_b])
    cache_a.requires_grad_(True)
    cache_b.requires_grad_(True)
    loss = loss_fn(cache_a, cache_b)  # also accumulates grads of loss parameters (temperature, bias)
    loss.backward()
    for embed, chunks, grads in ((embed_a, chunks_a, cache_a.grad), (embed_b, chunks_b, cache_b.grad)):
        for x, g in zip(chunks, grads.split(micro_batch), strict=True):
            embed(x).backward(g)
    return loss.detach()
