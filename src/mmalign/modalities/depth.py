"""The depth modality: a single-channel depth map in metres, resized to a fixed size, scaled by a maximum depth
and tokenised patch by patch (in the onellm family by the universal image tower's own patch embedding, as OneLLM
feeds depth maps to CLIP's conv1).

Loads a .npy float array (H, W) in metres, a 16-bit PNG in millimetres (the Kinect / NYU / TUM convention), PNG
or .npy bytes, and an in-memory float array (H, W). Zeros are allowed (sensors write 0 where they have no reading),
but not a map that is all zeros. The raw item is a float32 array (H, W) in metres.

The embedded "depth scenes": a back wall about 8 m away with a slight slope and sensor noise, and two objects, one
in each half of the view, each a disc or a square, one near (1.5-3.5 m) and one far (4.5-7 m). Questions ask which
object is nearer (left, right) and the shape of the nearer one (circle, square)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from mmalign.modalities.base import (
    MediaError,
    Modality,
    Synthetic,
    detail_convs,
    load_npy,
    open_image,
    register_modality,
    require_file,
)
from mmalign.modalities.image import ImageTokenizer

MILLIMETRE_MODES = {"I;16", "I;16L", "I;16B", "I"}  # a 16-bit greyscale PNG (older Pillow opens it as "I")
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _check_depth(depth: np.ndarray, name: str) -> np.ndarray:
    if depth.ndim == 3 and depth.shape[-1] in (3, 4):
        raise MediaError(f"{name} looks like a colour image, not a depth map (shape {depth.shape})")
    if depth.ndim != 2:
        raise MediaError(f"{name}: a depth map must be 2-D (H, W), got shape {depth.shape}")
    if depth.size == 0:
        raise MediaError(f"{name}: the depth map is empty, shape {depth.shape}")
    if not np.issubdtype(depth.dtype, np.floating):
        # An integer map could be millimetres or metres; guessing would silently scale depths by 1000.
        raise MediaError(f"{name}: a depth array must hold float metres, got {depth.dtype} (millimetres: 16-bit PNG)")
    if not np.isfinite(depth).all():
        raise MediaError(f"{name}: the depth map holds NaN or infinite values")
    if (depth < 0).any():
        raise MediaError(f"{name}: the depth map holds negative depths (min {float(depth.min()):.3g})")
    if not depth.any():
        raise MediaError(f"{name}: the depth map is all zeros (no readings)")
    return depth.astype(np.float32)


def _load_png(source: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with open_image(source, name) as img:  # over data.limits.max_image_pixels: fails before decoding
            img.load()
            mode = img.mode
            pixels = np.asarray(img)
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as err:
        raise MediaError(f"unreadable depth map {name}: {err}") from err
    if mode in COLOUR_MODES:
        raise MediaError(f"{name} looks like a colour image, not a depth map (PIL mode {mode})")
    if mode not in MILLIMETRE_MODES:
        raise MediaError(
            f"{name}: PIL mode {mode} holds no metric depth; expected a 16-bit greyscale PNG in millimetres"
        )
    return pixels.astype(np.float32) / np.float32(1000.0)  # millimetres -> metres


def load_depth(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """A depth map in metres, float32 (H, W), from a .npy file (metres), a 16-bit PNG (millimetres), their bytes,
    or a float array (H, W)."""
    if isinstance(source, np.ndarray):
        return _check_depth(source, "depth array")
    if isinstance(source, bytes):
        buf = io.BytesIO(source)
        depth = load_npy(buf, "<bytes>", ".npy depth map") if source[:6] == b"\x93NUMPY" else _load_png(buf, "<bytes>")
        return _check_depth(depth, "<bytes>")
    path = require_file(source, "depth map")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        depth = load_npy(path, str(path), ".npy depth map")
    elif suffix == ".png":
        depth = _load_png(path, str(path))
    else:
        raise MediaError(
            f"{path} is not a depth map file (suffix {suffix or 'none'!r}); expected .npy (metres) or a 16-bit .png "
            "(millimetres)"
        )
    return _check_depth(depth, str(path))


def preprocess_depth(depth: np.ndarray, encoder) -> torch.Tensor:
    """Resize to (size, size) bilinearly (antialiased when shrinking), divide by `encoder.max_depth` and clamp to
    [0, 1]: -> (1, size, size) float32. Missing readings (0) stay 0."""
    size = encoder.size
    x = torch.as_tensor(np.asarray(depth, dtype=np.float32))[None, None]  # (1, 1, H, W)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x[0] / encoder.max_depth).clamp(0.0, 1.0)


def detail_branch(channels: int, grid: int, width: int) -> nn.Module:
    """(items, 1, H, W) -> (items, width, grid, grid): two 3x3 convolutions at the map's own resolution, max-pooled
    onto the patch grid. A patch embedding sees an object a patch or two wide as a blur, too coarse to tell a circle
    from a square (the embedded near_shape question stayed near chance without this); edges and corners are what
    3x3 filters see. The last layer starts at zero, so a tokenizer with the branch starts as one without."""
    branch = nn.Sequential(
        *detail_convs(channels, "depth tokenizer"),
        nn.AdaptiveMaxPool2d(grid),  # one cell per patch
        nn.Conv2d(channels, width, 1),
    )
    nn.init.zeros_(branch[-1].weight)
    nn.init.zeros_(branch[-1].bias)
    return branch


def add_detail(tokens: torch.Tensor, detail: nn.Module | None, image: torch.Tensor, grid: int) -> torch.Tensor:
    """`tokens` (items, [cls +] grid * grid, width) with the detail branch's cells added to the patch tokens."""
    if detail is None:
        return tokens
    cells = detail(image).flatten(2).transpose(1, 2)  # (items, grid * grid, width), row-major as the patches
    return torch.cat([tokens[:, : -(grid**2)], tokens[:, -(grid**2) :] + cells], dim=1)


class DepthTokenizer(nn.Module):
    """The onellm family's depth tokenizer: a Conv2d patch embedding of the one depth channel after a learned class
    token, with learned positions; `detail_channels` > 0 adds `detail_branch`.
    (items, 1, size, size) -> (items, 1 + (size / patch) ** 2, width)."""

    def __init__(
        self, width: int, *, size: int = 32, patch: int = 8, max_depth: float = 10.0, detail_channels: int = 0
    ):
        super().__init__()
        for key, value in dict(size=size, patch=patch).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"depth tokenizer: {key} must be a positive integer, got {value!r}")
        if size % patch:
            raise ValueError(f"depth tokenizer: size={size} is not a multiple of patch={patch}")
        if not max_depth > 0:
            raise ValueError(f"depth tokenizer: max_depth must be positive (metres), got {max_depth!r}")
        self.size, self.patch, self.max_depth = size, patch, float(max_depth)
        self.hidden_size = width
        self.num_tokens = 1 + (size // patch) ** 2
        self.proj = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)
        self.grid = size // patch
        self.detail = detail_branch(detail_channels, self.grid, width) if detail_channels else None

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        if depth.ndim != 4 or tuple(depth.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"depth tokenizer expects (items, 1, {self.size}, {self.size}), got {depth.shape}")
        x = self.proj(depth).flatten(2).transpose(1, 2)  # (items, patches, width)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return add_detail(tokens, self.detail, depth, self.grid)


class TowerDepthTokenizer(ImageTokenizer):
    """The onellm family's depth tokenizer over an image tower: the map drawn as a grey image, near bright (as
    ImageBind feeds disparity rather than depth), through the image tokenizer, a copy of the tower's own patch
    embedding with its class token and positions (OneLLM's CLIP conv1). Depth then starts where the tower already
    sees shapes and sides; a fresh convolution with fresh positions left the frozen tower blind to which side is
    near. (items, 1, size, size) -> (items, num_tokens, width), size and tokens those of the tower.

    `detail_channels` > 0 adds `detail_branch` to the patch tokens (the shipped onellm curriculum sets 16)."""

    def __init__(self, universal, *, max_depth: float = 10.0, detail_channels: int = 0):
        if not max_depth > 0:
            raise ValueError(f"depth tokenizer: max_depth must be positive (metres), got {max_depth!r}")
        super().__init__(universal)
        self.size, self.max_depth = self.image_size, float(max_depth)
        # One grey level per channel, normalised as the tower normalises images.
        self.register_buffer("grey_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("grey_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.grid = self.image_size // self.patch_size
        self.detail = detail_branch(detail_channels, self.grid, self.hidden_size) if detail_channels else None

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        if depth.ndim != 4 or tuple(depth.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"depth tokenizer expects (items, 1, {self.size}, {self.size}), got {depth.shape}")
        grey = torch.where(depth > 0, 1.0 - depth, 0.0)  # a missing reading (0) is dark, not nearest
        tokens = super().forward((grey - self.grey_mean) / self.grey_std)  # (items, [cls +] grid * grid, width)
        return add_detail(tokens, self.detail, grey, self.grid)


def depth_tokenizer(universal, settings: dict) -> nn.Module:
    """Over an image tower (the onellm family's universal encoder): `TowerDepthTokenizer`, settings `max_depth`.
    Otherwise (e.g. inside the projector family's modality transformer): a fresh `DepthTokenizer`."""
    if hasattr(universal, "_body"):
        return TowerDepthTokenizer(universal, **settings)
    return DepthTokenizer(universal.hidden_size, **settings)


# ---- the embedded depth scenes -------------------------------------------------------------------------------

SIDE = 32
SIDES = ["left", "right"]
SHAPES = ["circle", "square"]
NEAR, FAR, WALL = (1.5, 3.5), (4.5, 7.0), 8.0  # metres

QUESTIONS = {
    "nearer": [
        "which object is nearer ?",
        "is the left or the right object closer ?",
        "which side is closer to the camera ?",
    ],
    "near_shape": [
        "what shape is the nearer object ?",
        "what is the shape of the closest object ?",
        "which shape is closer to the camera ?",
    ],
}


def synth_depth(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """One depth map (32, 32) float32 in metres, quantised to millimetres so the 16-bit PNG holds it exactly."""
    answers = {"nearer": rng.choice(SIDES), "near_shape": rng.choice(SHAPES)}
    g = np.random.default_rng(rng.randrange(2**32))
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float64)
    slope = g.uniform(-0.4, 0.4, 2)  # metres across the whole view
    depth = WALL + slope[0] * (x / (SIDE - 1) - 0.5) + slope[1] * (y / (SIDE - 1) - 0.5)
    half = SIDE // 2
    for side in SIDES:
        near = side == answers["nearer"]
        shape = answers["near_shape"] if near else rng.choice(SHAPES)
        r = g.uniform(3.5, 6.5)
        x0 = 0 if side == "left" else half
        cx, cy = g.uniform(x0 + r, x0 + half - 1 - r), g.uniform(r, SIDE - 1 - r)
        if shape == "circle":
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
        else:
            mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
        depth[mask] = g.uniform(*(NEAR if near else FAR))
    depth += g.normal(0, 0.02, depth.shape)
    millimetres = np.rint(depth * 1000).astype(np.uint16)
    return millimetres.astype(np.float32) / np.float32(1000.0), answers


def save_depth_png(depth: np.ndarray, path: str | Path) -> None:
    """Write a depth map in metres as a 16-bit greyscale PNG in millimetres (up to 65.535 m)."""
    depth = _check_depth(np.asarray(depth), str(path))
    if depth.max() > 65.535:
        raise ValueError(f"{path}: depths beyond 65.535 m do not fit a 16-bit PNG in millimetres")
    Image.fromarray(np.rint(depth * 1000).astype(np.uint16)).save(path, format="PNG")


def depth_caption(answers: dict[str, str], rng: random.Random) -> str:
    side, shape = answers["nearer"], answers["near_shape"]
    return rng.choice(
        [
            f"the {shape} on the {side} is nearer",
            f"the nearer object is a {shape} on the {side}",
            f"a depth map with a near {shape} on the {side}",
        ]
    )


DEPTH = register_modality(
    Modality(
        name="depth",
        placeholder="<depth>",
        record_key="depth",
        default_encoder="modality-transformer",
        load=load_depth,
        preprocess=preprocess_depth,
        tokenizer=depth_tokenizer,
        synthetic=Synthetic(
            make=synth_depth, save=save_depth_png, suffix=".png", questions=QUESTIONS, caption=depth_caption
        ),
    )
)
