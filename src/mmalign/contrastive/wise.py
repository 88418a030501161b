"""WiSE-FT (Wortsman et al. 2022): interpolate zero-shot and fine-tuned weights to keep what pretraining knew."""

from __future__ import annotations

import torch


def interpolate_weights(original: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * original + alpha * finetuned, key by key; alpha=0 is the original, 1 the fine-tuned model."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if original.keys() != finetuned.keys():
        missing = sorted(set(original) ^ set(finetuned))[:3]
        raise KeyError(f"the two state dicts hold different weights, e.g. {missing}")
    out = {}
    for key, a in original.items():
        b = finetuned[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        out[key] = torch.lerp(a.float(), b.float(), alpha).to(a.dtype) if a.is_floating_point() else b.clone()
    return out
