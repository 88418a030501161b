"""The image modality: load and validate a raw input, preprocess it into a normalised tensor for its encoder, the
onellm tokenizer (the tower's own patch embedding), and the embedded data's generator (a shapes scene)."""

from __future__ import annotations

import copy
import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from mmalign.data.shapes import ATTRIBUTES, CAPTION_PREFIXES, QUESTIONS, draw_scene, random_scene
from mmalign.modalities.base import MediaError, Modality, Synthetic, open_image, register_modality, require_file


def load_image(source: str | Path | bytes | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, an (H, W, 3) uint8 array or a PIL image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] != 3:
            raise MediaError(f"image array must be (H, W, 3), got {source.shape}")
        return Image.fromarray(source.astype(np.uint8), "RGB")
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        # The size comes from the header: an image over data.limits.max_image_pixels fails before it is decoded.
        img = open_image(io.BytesIO(source) if isinstance(source, bytes) else require_file(source, "image"), name)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as err:
        raise MediaError(f"unreadable image {name}: {err}") from err
    return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Resize to (size, size) with bicubic filtering, scale to [0, 1], normalise: -> (3, size, size) float32."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess_for(img: Image.Image, encoder) -> torch.Tensor:
    """One image as `encoder` (a vision tower with image_size, mean and std) expects it: (3, size, size)."""
    return preprocess_image(img, encoder.image_size, encoder.mean, encoder.std)


class ImageTokenizer(nn.Module):
    """The onellm family's image tokenizer: the universal tower's own patch embedding (class token and positions
    included, as OneLLM reuses CLIP's conv1), copied so it can train or stay frozen apart from the tower.
    (items, 3, H, W) -> (items, num_tokens, width)."""

    def __init__(self, universal):
        super().__init__()
        self.embeddings = copy.deepcopy(universal._body().embeddings)
        self.image_size, self.patch_size = universal.image_size, universal.patch_size
        self.mean, self.std = universal.mean, universal.std
        self.hidden_size = universal.hidden_size
        self.num_tokens = (self.image_size // self.patch_size) ** 2 + int(universal.has_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


def image_tokenizer(universal, settings: dict) -> ImageTokenizer:
    if settings:
        raise ValueError(f"the image tokenizer takes no settings (got {sorted(settings)}): it is the tower's own")
    return ImageTokenizer(universal)


def synth_image(rng: random.Random, size: int = 64) -> tuple[Image.Image, dict[str, str]]:
    """A shapes scene (1-3 objects sharing colour, shape and size, on one side) and its answers."""
    scene = random_scene(rng)
    return draw_scene(scene, rng, size), {q: scene.answer(q) for q in ATTRIBUTES}


def image_caption(answers: dict[str, str], rng: random.Random) -> str:
    noun = answers["shape"] + ("s" if answers["count"] != "one" else "")
    return (
        f"{rng.choice(CAPTION_PREFIXES)}{answers['count']} {answers['size']} {answers['color']} {noun} on the "
        + (answers["position"])
    )


IMAGE = register_modality(
    Modality(
        name="image",
        placeholder="<image>",
        record_key="image",
        default_encoder="clip",
        load=load_image,
        preprocess=preprocess_for,
        tokenizer=image_tokenizer,
        synthetic=Synthetic(
            make=synth_image,
            save=lambda img, path: img.save(path),
            suffix=".png",
            questions=QUESTIONS,
            caption=image_caption,
        ),
    )
)
