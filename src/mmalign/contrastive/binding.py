"""Binding another modality into a frozen image-text space (ImageBind, Girdhar et al. 2023).

An audio tower learns, with the CLIP loss, to land next to the frozen image embedding of its paired image. It
never sees text, yet afterwards audio can be classified from text prompts: zero-shot transfer through the shared
space (ImageBind §3.2, "emergent" alignment).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file
from torch import nn

from mmalign.contrastive.evaluate import retrieval_recall
from mmalign.contrastive.losses import ClipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder, TextTower, minilm_path
from mmalign.contrastive.train import _distinct_batch, _load_heads, zero_shot_from_prompts
from mmalign.data.shapes import Scene, load_split
from mmalign.modalities.audio import AudioEncoder, spectrogram, synth_scene_audio
from mmalign.models.encoders import clip_encoder
from mmalign.train.optim import decay_groups, warmup_cosine


def load_lit(lit_dir: str | Path) -> tuple[DualEncoder, TextTower]:
    """The frozen image-text model written by `mmalign contrastive`."""
    lit_dir = Path(lit_dir)
    text = TextTower.from_path(minilm_path()).eval().requires_grad_(False)
    image = clip_encoder(path=str(lit_dir / "image_encoder"))
    shape = json.loads((lit_dir / "results.json").read_text())
    model = DualEncoder(
        PooledEncoder(image),
        None,
        text_dim=text.hidden_size,
        embed_dim=shape.get("embed_dim", 128),
        text_head_hidden=shape.get("text_head_hidden", 0),
    )
    _load_heads(model, None, lit_dir / "heads.safetensors")  # the LiT loss (CLIP or SigLIP) is not needed here
    return model.eval().requires_grad_(False), text


def _audio_split(scenes: list[dict], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    waves = torch.from_numpy(np.stack([synth_scene_audio(s, rng) for s in scenes]))
    return spectrogram(waves)  # (N, frames, bins)


def train_binding(
    lit_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Bind synthetic audio to the frozen LiT image space; report audio zero-shot from text prompts (audio never
    paired with text) and audio-to-image retrieval on held-out scenes."""
    console = console or Console()
    torch.manual_seed(seed)
    lit, text = load_lit(lit_dir)
    image_encoder = lit.media_tower.encoder
    with torch.no_grad():
        train_px, train_scenes = load_split(data_dir, "train", image_encoder)
        targets = torch.cat([lit.embed_media(train_px[i : i + 256]) for i in range(0, len(train_px), 256)])
    train_audio = _audio_split(train_scenes, seed)
    audio = AudioEncoder(n_bins=train_audio.shape[-1])
    tower = PooledEncoder(audio)
    proj = nn.Linear(audio.hidden_size, targets.shape[1], bias=False)
    loss_fn = ClipLoss()
    params = [*tower.parameters(), *proj.parameters(), *loss_fn.parameters()]
    opt = torch.optim.AdamW(decay_groups(params, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.05))
    keys = [Scene(**s).caption(random.Random(0)) for s in train_scenes]
    gen = torch.Generator().manual_seed(seed)

    def embed_audio(spec: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(proj(tower(spec)), dim=-1)

    losses = []
    with Progress(console=console, disable=not progress) as bar:
        task = bar.add_task("binding audio", total=steps)
        for _ in range(steps):
            idx = _distinct_batch(keys, batch_size, gen)
            value = loss_fn(embed_audio(train_audio[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            loss_fn.clamp_()
            losses.append(value.item())
            bar.update(task, advance=1, description=f"binding audio loss {value.item():.3f}")

    with torch.no_grad():
        test_px, test_scenes = load_split(data_dir, "test", image_encoder)
        test_audio = embed_audio(_audio_split(test_scenes, seed + 1))
        zero_shot = zero_shot_from_prompts(test_audio, test_scenes, lit, text)
        recall = retrieval_recall(test_audio, lit.embed_media(test_px))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"tower.{k}": v for k, v in tower.state_dict().items()} | {"proj.weight": proj.weight.detach()}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "audio_encoder.safetensors")
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "audio_zero_shot_from_text": zero_shot,
        "audio_to_image": {k.replace("image_to_text", "audio_to_image").replace("text_to_image", "image_to_audio"): v
                           for k, v in recall.items()},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
