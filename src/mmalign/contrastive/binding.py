"""Binding another modality into a frozen image-text space (ImageBind, Girdhar et al. 2023).

An audio tower learns, with the CLIP loss, to land next to the frozen image embedding of its paired image. It
never sees text, yet afterwards audio can be classified from text prompts: zero-shot transfer through the shared
space (ImageBind §3.2, "emergent" alignment). A user's clips with no paired image bind to their captions instead,
through the locked text tower and LiT's frozen text head: the same space, reached from the other side.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from mmalign.contrastive.evaluate import retrieval_recall
from mmalign.contrastive.keys import caption_frames, caption_keys
from mmalign.contrastive.losses import ClipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder, TextTower, minilm_path
from mmalign.contrastive.train import ContrastiveObjective, _load_heads, lit_settings, zero_shot_from_prompts
from mmalign.data.pairs import Pairs, read_pairs, split_off
from mmalign.data.shapes import Scene, load_split
from mmalign.modalities.audio import AudioEncoder, clip_frames, spectrogram, synth_scene_audio
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


@torch.no_grad()
def _targets(pairs: Pairs, captions: list[str], lit: DualEncoder, text: TextTower) -> tuple[torch.Tensor, str]:
    """Each pair's place in the frozen space: its paired image's embedding, else its caption's (`captions`: the
    caption keys, templates stripped as in LiT, through the locked text tower). (N, E) and what the targets are:
    image, text or paired."""
    images = [i for i, p in enumerate(pairs.partners) if p is not None]
    rows = [None] * len(pairs.ids)
    if images:
        embedded = lit.embed_media(torch.stack([pairs.partners[i] for i in images]))
        for i, e in zip(images, embedded, strict=True):
            rows[i] = e
    texts = [i for i, r in enumerate(rows) if r is None]
    if texts:
        embedded = lit.embed_text_features(text.encode([captions[i] for i in texts]))
        for i, e in zip(texts, embedded, strict=True):
            rows[i] = e
    kind = "image" if not texts else "text" if not images else "paired"
    return torch.stack(rows), kind


def _user_pairs(data: Path, folder: Path | None, lit: DualEncoder, text: TextTower, audio: AudioEncoder, seed: int,
                console: Console):  # fmt: skip
    """Audio records of a LLaVA-format file bound to their paired image (or, without one, their caption); 5% of
    them (at least one, at most 256) held out for retrieval."""
    if folder is None:
        raise ValueError(f"{data} is a data file: give the folder its audio and image paths are relative to")
    pairs = read_pairs(data, folder, audio, modality="audio", partner=("image", lit.media_tower.encoder))
    if pairs.skipped:
        console.print(f"[yellow]skipped {len(pairs.skipped)} unreadable records[/], e.g. {pairs.skipped[0]}")
    bare = zip(pairs.ids, pairs.texts, pairs.partners, strict=True)
    empty = [name for name, text, partner in bare if not text and partner is None]
    if empty:
        raise ValueError(f"{len(empty)} audio records have neither an image nor a caption to bind to, e.g. {empty[0]}")
    if len(pairs.ids) < 2:
        raise ValueError(f"{data}: binding needs at least 2 audio records, found {len(pairs.ids)}")
    train, held = split_off(pairs, seed)
    frames = caption_frames(train.texts)
    captions = caption_keys(train.texts, frames)
    targets, kind = _targets(train, captions, lit, text)
    held_targets, _ = _targets(held, caption_keys(held.texts, frames), lit, text)
    # Records with the same image (by content) or the same caption are one target: keep them apart in a batch.
    keys = [k if p is None else hashlib.sha1(p.numpy().tobytes()).hexdigest()
            for p, k in zip(train.partners, captions, strict=True)]  # fmt: skip
    return train.media, targets, keys, (held.media, held_targets), kind


def train_binding(
    lit_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    media_folder: str | Path | None = None,
    seconds: float = 0.6,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    overrides: list[str] = (),
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Bind audio to the frozen LiT image space; report audio-to-target retrieval on held-out pairs. A Trainer run,
    like every objective.

    `data_dir` is the embedded shapes folder (each scene gets a synthetic sound; audio zero-shot from text prompts
    is reported too, audio never paired with text) or a LLaVA-format file of records with an `audio` item and a
    paired `image` (or, lacking one, a caption as the first reply), paths relative to `media_folder`. Clips are
    cropped or padded to `seconds`."""
    console = console or Console()
    torch.manual_seed(seed)
    out = Path(out_dir)
    settings = lit_settings(out, steps, batch_size, lr, seed, progress, overrides)
    lit, text = load_lit(lit_dir)
    image_encoder = lit.media_tower.encoder
    data = Path(data_dir)
    if data.is_dir():
        with torch.no_grad():
            train_px, train_scenes = load_split(data, "train", image_encoder)
            targets = torch.cat([lit.embed_media(train_px[i : i + 256]) for i in range(0, len(train_px), 256)])
        train_audio = _audio_split(train_scenes, seed)
        keys = [Scene(**s).caption(random.Random(0)) for s in train_scenes]
        audio, held, kind = AudioEncoder(n_bins=train_audio.shape[-1]), None, "image"
    else:
        audio = AudioEncoder(seconds=seconds, max_frames=max(64, clip_frames(seconds)))
        train_audio, targets, keys, held, kind = _user_pairs(data, media_folder and Path(media_folder), lit, text,
                                                             audio, seed, console)  # fmt: skip
    tower = PooledEncoder(audio)
    proj = nn.Linear(audio.hidden_size, targets.shape[1], bias=False)

    def embed_audio(spec: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(proj(tower(spec)), dim=-1)

    objective = ContrastiveObjective(
        embed_audio, lambda t: t, {"tower": tower, "proj": proj}, ClipLoss(), train_audio, targets, keys, held_out=held
    )
    summary = Trainer(objective, settings, console=console, resume=resume).fit()
    objective.cpu().eval()
    with torch.no_grad():
        if held is None:
            test_px, test_scenes = load_split(data, "test", image_encoder)
            test_audio = embed_audio(_audio_split(test_scenes, seed + 1))
            zero_shot = zero_shot_from_prompts(test_audio, test_scenes, lit, text)
            recall = retrieval_recall(test_audio, lit.embed_media(test_px))
        else:
            zero_shot, recall = {}, retrieval_recall(embed_audio(held[0]), held[1])
    state = {f"tower.{k}": v for k, v in tower.state_dict().items()} | {"proj.weight": proj.weight.detach()}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "audio_encoder.safetensors")
    (out / "audio_encoder.json").write_text(json.dumps(audio.settings))
    name = f"audio_to_{kind}"
    result = {
        "pairs": len(keys),
        "targets": kind,
        "first_loss": summary["first_losses"].get(objective.name),
        "last_loss": summary["loss"],
        "audio_zero_shot_from_text": zero_shot,
        name: {k.replace("image_to_text", name).replace("text_to_image", f"{kind}_to_audio"): v
               for k, v in recall.items()},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
