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
from safetensors.torch import save_file
from torch import nn

from mmalign.contrastive.keys import caption_frames, caption_keys
from mmalign.contrastive.losses import ClipLoss
from mmalign.contrastive.model import TextTower, minilm_path
from mmalign.contrastive.train import ContrastiveObjective
from mmalign.data.pairs import read_pairs, split_off
from mmalign.modalities.base import get_modality
from mmalign.models.encoders import load_tower
from mmalign.train.trainer import Trainer, run_settings


class BindingObjective(ContrastiveObjective):
    """A contrastive objective whose checkpoints leave out the frozen universal tower: it may be a large pretrained
    network the user pointed at, and every modality's run would otherwise hold a copy of it."""

    unsaved = ("parts.universal.",)


def binding_objective(universal: nn.Module, tokenizer: nn.Module, media: torch.Tensor, targets: torch.Tensor,
                      keys: list[str], held_out=None, embed_dim: int = 128, repeats: bool = False):  # fmt: skip
    """The CLIP loss between `tokenizer`'s input pooled over the frozen `universal` tower's tokens and the locked
    text features `targets`; the tokenizer and both heads train. `repeats`: full random batches whose repeated
    contents count as matches, instead of batches of distinct contents only (at most as many rows as there are
    contents: 8 for the embedded point clouds)."""
    media_head = nn.Linear(universal.hidden_size, embed_dim)
    text_head = nn.Linear(targets.shape[1], embed_dim)

    def embed_media(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(media_head(universal.encode_tokens(tokenizer(x)).mean(1)), dim=-1)

    def embed_targets(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_head(t), dim=-1)

    parts = {"universal": universal.requires_grad_(False), "tokenizer": tokenizer, "media_head": media_head,
             "text_head": text_head}  # fmt: skip
    return BindingObjective(
        embed_media, embed_targets, parts, ClipLoss(), media, targets, keys, held_out=held_out, repeats=repeats
    )


def bind_tokenizer(universal: nn.Module, tokenizer: nn.Module, pairs, text: TextTower, out: Path, *,
                   steps: int, batch_size: int, lr: float, seed: int, repeats: bool = False, overrides=(),
                   resume: bool = False, progress: bool, console: Console) -> dict:  # fmt: skip
    """Train `tokenizer` in place, a run of the Trainer under `out` (resumable, `train.key=value` overrides), with
    5% of the pairs (at most 256) held out for retrieval; {first_loss, last_loss, pairs, contents, held_out}."""
    torch.manual_seed(seed)
    frames = caption_frames(pairs.texts)  # templates, found over all captions, are dropped from each
    train, held = split_off(pairs, seed)
    keys, held_keys = caption_keys(train.texts, frames), caption_keys(held.texts, frames)
    with torch.no_grad():
        targets, held_targets = text.encode(keys), text.encode(held_keys)
    objective = binding_objective(universal, tokenizer, train.media, targets, keys, (held.media, held_targets),
                                  repeats=repeats)  # fmt: skip
    settings = run_settings(out, overrides, lr=lr, max_steps=steps, batch_size=batch_size, warmup_ratio=0.05,
                            weight_decay=0.01, clip_grad=0.0, seed=seed, progress=progress, log_every=10)  # fmt: skip
    summary = Trainer(objective, settings, console=console, resume=resume).fit()
    objective.cpu().eval()
    return {
        "first_loss": summary["first_losses"].get(objective.name),
        "last_loss": summary["loss"],
        "pairs": len(keys),
        "contents": len(set(objective.keys)),  # the objective's keys: each caption's content
        "held_out": summary["eval"],
    }


def bind_tokenizers(encoder: str | Path, captions: dict[str, str | Path], folder: str | Path, out: str | Path, *,
                    steps: int = 300, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, repeats: bool = False,
                    settings: dict[str, dict] | None = None, overrides=(), resume: bool = False,
                    console: Console | None = None, progress: bool = True) -> dict:  # fmt: skip
    """For each {modality: caption file}, its tokenizer (built with `settings[modality]`, as a recipe's
    `model.media.<modality>.tokenizer` gives them) bound through the frozen tower at `encoder`; writes
    `out/<modality>.safetensors` (the Trainer's run under `out/runs/<modality>`) and returns {modality: figures}."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    universal = load_tower(encoder).eval().requires_grad_(False)
    text = TextTower.from_path(minilm_path()).eval().requires_grad_(False)
    results = {}
    for m, path in captions.items():
        tokenizer = get_modality(m).tokenizer(universal, dict((settings or {}).get(m, {})))
        pairs = read_pairs([path], folder, tokenizer, modality=m)
        if len(pairs.texts) < 2:
            raise ValueError(f"{path}: {len(pairs.texts)} readable {m} caption records; binding the {m} tokenizer "
                             "needs at least 2")  # fmt: skip
        r = bind_tokenizer(universal, tokenizer, pairs, text, out / "runs" / m, steps=steps, batch_size=batch_size,
                           lr=lr, seed=seed, repeats=repeats, overrides=overrides, resume=resume, progress=progress,
                           console=console)  # fmt: skip
        save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(out / f"{m}.safetensors"))
        recall = r["held_out"].get("held_out_image_to_text_R@1")
        held = f", held-out {m}-to-text R@1 {recall:.0%}" if recall is not None else ""
        console.print(f"{m} tokenizer bound to text ({r['pairs']} captions, {r['contents']} distinct): "
                      f"CLIP loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}{held}")  # fmt: skip
        results[m] = r
    return results
