"""Binding each onellm tokenizer to text through the frozen universal encoder, before any LLM sees it.

A modality tokenizer starts from random weights, and a path that starts random is one the LLM learns to ignore:
trained through the frozen LLM, such a tokenizer gets the attributes a mean over its input carries and little else
(the signal modality's "which region" stayed at chance). So each new modality's tokenizer is first trained with the
CLIP loss to land its input, pooled over the universal encoder's tokens, next to the locked MiniLM embedding of its
caption (ImageBind and LanguageBind align every modality to one space the same way). Captions are read without
their templates, and equal contents are kept apart in a batch (`mmalign.contrastive.keys`). The tokenizer weights
go to `<out>/<modality>.safetensors`, which `model.onellm.tokenizers` loads when a model is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from safetensors.torch import save_file
from torch import nn

from mmalign.contrastive.keys import caption_keys, same_content
from mmalign.contrastive.losses import ClipLoss
from mmalign.contrastive.model import TextTower, minilm_path
from mmalign.contrastive.train import _distinct_batch
from mmalign.data.pairs import read_pairs
from mmalign.modalities.base import get_modality
from mmalign.models.encoders import load_tower


def bind_tokenizer(universal: nn.Module, modality: str, tokenizer: nn.Module, media: torch.Tensor, texts: list[str],
                   text: TextTower, *, steps: int, batch_size: int, lr: float, seed: int,
                   progress: bool) -> dict:  # fmt: skip
    """Train `tokenizer` in place; {first_loss, last_loss, pairs, contents}."""
    torch.manual_seed(seed)
    keys = caption_keys(texts)
    with torch.no_grad():
        targets = text.encode(keys)
    keys = same_content(keys)
    media_head, text_head = nn.Linear(universal.hidden_size, 128), nn.Linear(targets.shape[1], 128)
    loss_fn = ClipLoss()
    params = [*tokenizer.parameters(), *media_head.parameters(), *text_head.parameters(), *loss_fn.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    tokenizer.train()
    losses = []
    for _ in track(range(steps), description=f"binding {modality}", disable=not progress):
        idx = _distinct_batch(keys, batch_size, gen)
        pooled = universal.encode_tokens(tokenizer(media[idx])).mean(1)
        loss = loss_fn(F.normalize(media_head(pooled), dim=-1), F.normalize(text_head(targets[idx]), dim=-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_fn.clamp_()
        losses.append(loss.item())
    tokenizer.eval()
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]), "pairs": len(keys),
            "contents": len(set(keys))}  # fmt: skip


def bind_tokenizers(encoder: str | Path, captions: dict[str, str | Path], folder: str | Path, out: str | Path, *,
                    steps: int = 300, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                    console: Console | None = None, progress: bool = True) -> dict:  # fmt: skip
    """For each {modality: caption file}, its tokenizer bound through the frozen tower at `encoder`; writes
    `out/<modality>.safetensors` and returns {modality: figures}."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    universal = load_tower(encoder).eval().requires_grad_(False)
    text = TextTower.from_path(minilm_path()).eval().requires_grad_(False)
    results = {}
    for m, path in captions.items():
        tokenizer = get_modality(m).tokenizer(universal, {})
        pairs = read_pairs([path], folder, tokenizer, modality=m)
        if not pairs.texts:
            raise ValueError(f"{path}: no readable {m} caption records to bind the {m} tokenizer with")
        r = bind_tokenizer(universal, m, tokenizer, pairs.media, pairs.texts, text, steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, progress=progress)  # fmt: skip
        save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(out / f"{m}.safetensors"))
        console.print(f"{m} tokenizer bound to text ({r['pairs']} captions, {r['contents']} distinct): "
                      f"CLIP loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}")  # fmt: skip
        results[m] = r
    return results
