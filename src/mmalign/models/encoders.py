"""Vision encoders: any Hugging Face CLIP or SigLIP vision tower, read out at a chosen hidden layer.

The tower runs only up to the selected layer (LLaVA-1.5 reads layer -2, so the last block is never computed),
and a frozen tower runs under `torch.no_grad` so no activations are kept for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmalign.registry import register_encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Built-in sizes for the embedded default; still real Hugging Face towers, so export and parity work unchanged.
PRESETS = {
    "tiny-vit": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
    ),
}


class VisionEncoder(nn.Module):
    """Wraps a HF vision tower; `forward(pixel_values (B, 3, H, W)) -> features (B, num_tokens, hidden_size)`."""

    def __init__(
        self,
        tower: nn.Module,
        *,
        family: str,
        feature_layer: int = -2,
        keep_cls: bool = False,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ):
        super().__init__()
        self.tower = tower
        self.family = family
        cfg = tower.config
        n_layers = cfg.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of block i.
        index = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"feature_layer {feature_layer} is out of range for a {n_layers}-layer encoder")
        self.feature_layer = feature_layer
        self.num_blocks = index
        self.has_cls = family == "clip"
        if keep_cls and not self.has_cls:
            raise ValueError(f"keep_cls=True but a {family} tower has no CLS token")
        self.keep_cls = keep_cls
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.hidden_size = cfg.hidden_size
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the single number that both the processor and the model use."""
        patches = (self.image_size // self.patch_size) ** 2
        return patches + int(self.has_cls and self.keep_cls)

    def _body(self) -> nn.Module:
        return getattr(self.tower, "vision_model", self.tower)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encode_tokens(self._body().embeddings(pixel_values))  # CLIP: (B, 1 + patches, D); SigLIP: patches
        if self.has_cls and not self.keep_cls:
            x = x[:, 1:]
        return x

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's blocks up to the feature layer over token embeddings (B, N, D) from any tokenizer: how the
        onellm family uses an image tower as the universal encoder of every modality."""
        body = self._body()
        if hasattr(body, "pre_layrnorm"):
            x = body.pre_layrnorm(x)
        for block in body.encoder.layers[: self.num_blocks]:
            x = block(x, None)
        return x


def read_image_norm(path: Path) -> dict:
    """image_mean/image_std saved beside a tower: by mmalign, by an image processor, or inside a processor config
    (transformers 5 nests the image processor there)."""
    for name in ("mmalign_image.json", "preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            data = json.loads(f.read_text())
            data = data.get("image_processor", data)
            norm = {k: tuple(data[k]) for k in ("image_mean", "image_std") if k in data}
            if norm:
                return norm
    return {}


TOWER_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def tower_family(path: str | Path) -> str:
    """ "clip" or "siglip": which registered encoder reads the Hugging Face tower saved at `path` (its config's
    model_type; a whole CLIP or SigLIP model counts, its vision half is read)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face CLIP or SigLIP (vision) model folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in TOWER_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not a CLIP or SigLIP vision tower (one of {sorted(TOWER_TYPES)})"
        )
    return TOWER_TYPES[model_type]


def load_tower(path: str | Path, *, feature_layer: int = -2, keep_cls: bool = False) -> VisionEncoder:
    """The CLIP or SigLIP tower saved at `path`, whichever it is."""
    return _build(tower_family(path), str(path), None, {}, feature_layer, keep_cls)


def _build(family: str, path: str | None, preset: str | None, config: dict, feature_layer: int, keep_cls: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    model_cls, cfg_cls = (
        (CLIPVisionModel, CLIPVisionConfig) if family == "clip" else (SiglipVisionModel, SiglipVisionConfig)
    )
    default_mean, default_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else ((0.5,) * 3, (0.5,) * 3)
    if path:
        if not Path(path).exists():
            raise FileNotFoundError(f"encoder path {path} does not exist")
        tower = model_cls.from_pretrained(path)
        norm = read_image_norm(Path(path))
        mean, std = norm.get("image_mean", default_mean), norm.get("image_std", default_std)
    else:
        if preset and preset not in PRESETS:
            raise KeyError(f"unknown encoder preset {preset!r}; known: {sorted(PRESETS)}")
        kwargs = {**PRESETS.get(preset or "", {}), **config}
        tower = model_cls(cfg_cls(**kwargs))
        mean, std = default_mean, default_std
    return VisionEncoder(tower, family=family, feature_layer=feature_layer, keep_cls=keep_cls, mean=mean, std=std)


@register_encoder("clip")
def clip_encoder(*, path=None, preset=None, config=None, feature_layer=-2, keep_cls=False, **_) -> VisionEncoder:
    return _build("clip", path, preset, config or {}, feature_layer, keep_cls)


@register_encoder("siglip")
def siglip_encoder(*, path=None, preset=None, config=None, feature_layer=-2, keep_cls=False, **_) -> VisionEncoder:
    return _build("siglip", path, preset, config or {}, feature_layer, keep_cls)


class FusedEncoder(nn.Module):
    """Several encoders over the same input, features concatenated per token (Prismatic VLMs' DINOv2 + SigLIP,
    Karamcheti et al. 2024 §4.2). The input is preprocessed for the first encoder; one that normalises its input
    differently gets it re-normalised, and one of another size gets it resized."""

    def __init__(self, encoders: list[nn.Module]):
        super().__init__()
        first = encoders[0]
        for e in encoders[1:]:
            if e.num_tokens != first.num_tokens:
                raise ValueError(
                    f"fused encoders must give the same number of tokens per item: {first.num_tokens} vs {e.num_tokens}"
                )
        self.encoders = nn.ModuleList(encoders)
        self.parts = [e.hidden_size for e in encoders]  # each encoder's share of a token's features
        self.hidden_size = sum(self.parts)
        self.num_tokens = first.num_tokens
        # Preprocessing follows the first encoder (the processor reads these).
        for attr in ("image_size", "patch_size", "mean", "std", "num_samples", "n_fft", "hop"):
            if hasattr(first, attr):
                setattr(self, attr, getattr(first, attr))

    def _adapt(self, x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        first = self.encoders[0]
        if not hasattr(first, "mean"):
            return x
        if (encoder.mean, encoder.std) != (first.mean, first.std):
            raw = x * torch.tensor(first.std).view(1, 3, 1, 1) + torch.tensor(first.mean).view(1, 3, 1, 1)
            x = (raw - torch.tensor(encoder.mean).view(1, 3, 1, 1)) / torch.tensor(encoder.std).view(1, 3, 1, 1)
        if encoder.image_size != first.image_size:
            x = nn.functional.interpolate(x, size=encoder.image_size, mode="bicubic", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(items, ...) -> (items, num_tokens, sum of the encoders' hidden sizes)."""
        return torch.cat([e(self._adapt(x, e).to(x.dtype)) for e in self.encoders], dim=-1)


def save_encoder(encoder: VisionEncoder, out: str | Path) -> None:
    """Write the tower as a HF folder plus its normalisation, so `encoder.path` can load it."""
    out = Path(out)
    encoder.tower.save_pretrained(out)
    (out / "mmalign_image.json").write_text(json.dumps({"image_mean": encoder.mean, "image_std": encoder.std}))
