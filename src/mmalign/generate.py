"""Batched generation with a KV cache: left padding, greedy or sampling (temperature, top-p), stop tokens."""

from __future__ import annotations

import torch
from torch import nn


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row's last token is at position T - 1."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens."""
    if temperature <= 0:
        return logits.max(-1).indices  # argmax's answer (first index on ties), several times faster on CPU
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()  # cheaper than no_grad per op: no view or version tracking, and nothing here needs it
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    media: dict[str, torch.Tensor] | None = None,
    *,
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded), for any family: the model's `prefill` runs the prompts and
    their media once (sizing its KV cache for `max_new_tokens`), `step` continues one token at a time with its KV
    cache, and is not called after the last token needed. `media` holds, per modality, every item of every prompt
    in order. A row that has stopped keeps being fed its own picks until every row has; its answer ends at its
    first stop token."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    media = {m: x.to(device) for m, x in (media or {}).items()}
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    logits, state = model.prefill(ids.to(device), mask.to(device), media, max_new_tokens)
    stops = torch.tensor(stop_ids, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    picked = torch.empty((len(prompts), max_new_tokens), dtype=torch.long, device=device)  # (B, max_new_tokens)
    steps = 0
    while steps < max_new_tokens:
        token = _pick(logits, temperature, top_p, generator)  # (B,)
        picked[:, steps] = token
        steps += 1
        done |= torch.isin(token, stops)
        if steps == max_new_tokens or bool(done.all()):
            break
        logits = model.step(state, token)
    picked = picked[:, :steps]  # (B, steps)
    before_stop = (~torch.isin(picked, stops)).long().cumprod(-1)  # (B, steps) 1 up to each row's first stop token
    return [row[:end] for row, end in zip(picked.tolist(), before_stop.sum(-1).tolist(), strict=True)]
