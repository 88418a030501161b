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
from safetensors.torch import save_file
from torch import nn

from mmalign.contrastive.evaluate import retrieval_recall
from mmalign.contrastive.losses import ClipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder, TextTower, minilm_path
from mmalign.contrastive.train import ContrastiveObjective, _load_heads, lit_settings, zero_shot_from_prompts
from mmalign.data.shapes import Scene, load_split
from mmalign.modalities.audio import AudioEncoder, spectrogram, synth_scene_audio
from mmalign.models.encoders import clip_encoder
from mmalign.train.trainer import Trainer


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
    overrides: list[str] = (),
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Bind synthetic audio to the frozen LiT image space; report audio zero-shot from text prompts (audio never
    paired with text) and audio-to-image retrieval on held-out scenes. A Trainer run, like every objective."""
    console = console or Console()
    torch.manual_seed(seed)
    out = Path(out_dir)
    settings = lit_settings(out, steps, batch_size, lr, seed, progress, overrides)
    lit, text = load_lit(lit_dir)
    image_encoder = lit.media_tower.encoder
    with torch.no_grad():
        train_px, train_scenes = load_split(data_dir, "train", image_encoder)
        targets = torch.cat([lit.embed_media(train_px[i : i + 256]) for i in range(0, len(train_px), 256)])
    train_audio = _audio_split(train_scenes, seed)
    audio = AudioEncoder(n_bins=train_audio.shape[-1])
    tower = PooledEncoder(audio)
    proj = nn.Linear(audio.hidden_size, targets.shape[1], bias=False)

    def embed_audio(spec: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(proj(tower(spec)), dim=-1)

    keys = [Scene(**s).caption(random.Random(0)) for s in train_scenes]
    objective = ContrastiveObjective(
        embed_audio, lambda t: t, {"tower": tower, "proj": proj}, ClipLoss(), train_audio, targets, keys
    )
    summary = Trainer(objective, settings, console=console, resume=resume).fit()
    objective.cpu().eval()
    with torch.no_grad():
        test_px, test_scenes = load_split(data_dir, "test", image_encoder)
        test_audio = embed_audio(_audio_split(test_scenes, seed + 1))
        zero_shot = zero_shot_from_prompts(test_audio, test_scenes, lit, text)
        recall = retrieval_recall(test_audio, lit.embed_media(test_px))
    state = {f"tower.{k}": v for k, v in tower.state_dict().items()} | {"proj.weight": proj.weight.detach()}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "audio_encoder.safetensors")
    result = {
        "first_loss": summary["first_losses"].get(objective.name),
        "last_loss": summary["loss"],
        "audio_zero_shot_from_text": zero_shot,
        "audio_to_image": {k.replace("image_to_text", "audio_to_image").replace("text_to_image", "image_to_audio"): v
                           for k, v in recall.items()},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
