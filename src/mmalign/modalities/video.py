"""The video modality: a clip of RGB frames, uniformly sampled to a fixed number of frames, resized and normalised,
and tokenised by a tubelet (Conv3d) embedding so the order of frames, and with it the direction of motion, stays
visible to the universal encoder.

Loads an animated GIF (every frame), a folder of PNG/JPEG frames (sorted by name, numbers compared as numbers),
a .npy array or an in-memory array of shape (frames, H, W, 3) uint8, GIF/.npy/MP4 bytes, and MP4 (or MOV, AVI,
MKV, WebM) through PyAV, an optional dependency. The raw item is a uint8 array (frames, H, W, 3).

The embedded "moving shapes" clips: one coloured shape crosses a noisy light background in 8 frames of 32x32
pixels; questions ask its direction (left, right, up, down), speed (slow: 1 pixel per frame, fast: 3), shape
(circle, square, triangle) and colour (red, green, blue, yellow)."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence, UnidentifiedImageError
from torch import nn

from mmalign.modalities.base import (
    MediaError,
    Modality,
    Synthetic,
    check_limit,
    load_npy,
    open_image,
    register_modality,
    require_file,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg"}
CONTAINER_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"}
INSTALL_HINT = "pip install av (or the package's `video` extra)"


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"{name}: a video must be (frames, H, W, 3), got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise MediaError(f"{name}: the video holds zero frames")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise MediaError(f"{name}: the frames are empty, shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise MediaError(f"{name}: video frames must be uint8 (0-255), got {frames.dtype}")
    return frames


def _stack(frames: list[np.ndarray], name: str) -> np.ndarray:
    if not frames:
        raise MediaError(f"{name}: the video holds zero frames")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise MediaError(f"{name}: frames differ in size: {sorted(sizes)}")
    return np.stack(frames)


def _check_count(count: int, name: str, at_least: bool = False) -> None:
    """MediaError naming data.limits.max_video_frames when a clip holds (or claims) more frames than it allows."""
    check_limit(name, count, "max_video_frames", f"{'at least ' if at_least else ''}{count} frames")


def _load_gif(source: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with open_image(source, name) as img:
            # PIL composes each frame with the previous ones according to its disposal method. A GIF's header
            # gives no frame count: decoding stops at the first frame past the limit.
            frames = []
            for frame in ImageSequence.Iterator(img):
                _check_count(len(frames) + 1, name, at_least=True)
                frames.append(np.asarray(frame.convert("RGB")))
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as err:
        raise MediaError(f"unreadable GIF {name}: {err}") from err
    return _stack(frames, name)


def _natural_key(path: Path) -> list:
    # "frame2" before "frame10", as a person numbering frames means it.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name.lower())]


def _load_folder(folder: Path) -> np.ndarray:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not files:
        raise MediaError(f"{folder}: the folder holds zero frames (no {', '.join(sorted(FRAME_SUFFIXES))} files)")
    _check_count(len(files), str(folder))
    frames = []
    for file in files:
        try:
            with open_image(file, str(file)) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except MediaError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise MediaError(f"unreadable frame {file}: {err}") from err
    return _stack(frames, str(folder))


def _load_container(source: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        import av
    except ImportError as err:
        raise MediaError(f"reading {name} needs PyAV: {INSTALL_HINT}") from err
    try:
        with av.open(source if isinstance(source, io.BytesIO) else str(source)) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: the file holds no video stream")
            _check_count(container.streams.video[0].frames, name)  # 0 when the container does not say
            frames = []
            for frame in container.decode(video=0):
                _check_count(len(frames) + 1, name, at_least=True)  # the header may not say, or may lie
                frames.append(frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as err:
        raise MediaError(f"unreadable video {name}: {err}") from err
    return _stack(frames, name)


def _load_npy(source: Path | io.BytesIO, name: str) -> np.ndarray:
    # An .npy file is stored uncompressed, so loading it costs what the file weighs; its frames count after.
    frames = load_npy(source, name, ".npy video")
    if frames.ndim:
        _check_count(len(frames), name)
    return frames


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name the OS refuses (too long, ...): require_file says so
        return False


def load_video(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """A clip as a uint8 array (frames, H, W, 3) from a GIF, a folder of frames, a .npy file, an MP4 (PyAV),
    GIF/.npy/MP4 bytes or an array of that shape."""
    if isinstance(source, np.ndarray):
        return _check_frames(source, "video array")
    if isinstance(source, bytes):
        name, buf = "<bytes>", io.BytesIO(source)
        if source[:4] == b"GIF8":
            return _check_frames(_load_gif(buf, name), name)
        if source[:6] == b"\x93NUMPY":
            return _check_frames(_load_npy(buf, name), name)
        return _check_frames(_load_container(buf, name), name)
    path = Path(source)
    if _is_dir(path):
        return _check_frames(_load_folder(path), str(path))
    path = require_file(path, "video")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        frames = _load_gif(path, str(path))
    elif suffix == ".npy":
        frames = _load_npy(path, str(path))
    elif suffix in CONTAINER_SUFFIXES:
        frames = _load_container(path, str(path))
    else:
        hint = " (one image is not a video: give a folder of frames)" if suffix in FRAME_SUFFIXES else ""
        raise MediaError(
            f"{path} is not a video file (suffix {suffix or 'none'!r}){hint}; expected .gif, .npy, "
            f"{', '.join(sorted(CONTAINER_SUFFIXES))} or a folder of frames"
        )
    return _check_frames(frames, str(path))


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread uniformly over `total` frames (the centre of each of `num_frames` equal
    segments), so a shorter clip repeats frames in order and a longer one skips them evenly."""
    return ((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64).clip(0, total - 1)


def preprocess_video(frames: np.ndarray, encoder) -> torch.Tensor:
    """`encoder.num_frames` frames sampled uniformly, each resized to (size, size) with bicubic filtering,
    scaled to [0, 1] and normalised with the encoder's mean and std: -> (num_frames, 3, size, size) float32."""
    size = encoder.size
    picked = []
    for i in frame_indices(len(frames), encoder.num_frames):
        img = Image.fromarray(frames[i], "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        picked.append(np.asarray(img))
    x = torch.from_numpy(np.stack(picked).astype(np.float32) / 255.0).permute(0, 3, 1, 2)  # (T, 3, size, size)
    mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def check_tubelets(num_frames, size, tubelet, patch, patch_name: str) -> None:
    """Settings a tubelet embedding can cut: positive integers, frames in whole tubelets, frames in whole patches."""
    for key, value in dict(num_frames=num_frames, size=size, tubelet=tubelet, patch=patch).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"video tokenizer: {key} must be a positive integer, got {value!r}")
    if num_frames % tubelet:
        raise ValueError(f"video tokenizer: num_frames={num_frames} is not a multiple of tubelet={tubelet}")
    if size % patch:
        raise ValueError(f"video tokenizer: size={size} is not a multiple of {patch_name} {patch}")


class VideoTokenizer(nn.Module):
    """The onellm family's video tokenizer: a tubelet embedding (Conv3d with kernel = stride = (tubelet, patch,
    patch), as ViViT and ImageBind embed video) after a learned class token, with a learned position per
    (time, row, column) tubelet so the order of frames is visible.
    (items, num_frames, 3, size, size) -> (items, 1 + (num_frames / tubelet) * (size / patch) ** 2, width)."""

    def __init__(
        self,
        width: int,
        *,
        num_frames: int = 8,
        size: int = 32,
        tubelet: int = 2,
        patch: int = 8,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ):
        super().__init__()
        check_tubelets(num_frames, size, tubelet, patch, "patch")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"video tokenizer: mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        self.num_frames, self.size, self.tubelet, self.patch = num_frames, size, tubelet, patch
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.hidden_size = width
        self.num_tokens = 1 + (num_frames // tubelet) * (size // patch) ** 2
        self.proj = nn.Conv3d(3, width, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        expected = (self.num_frames, 3, self.size, self.size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video tokenizer expects (items, {', '.join(map(str, expected))}), got {video.shape}")
        x = self.proj(video.transpose(1, 2))  # (items, width, T / tubelet, size / patch, size / patch)
        x = x.flatten(2).transpose(1, 2)  # (items, tubelets, width), time-major
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


class TowerVideoTokenizer(nn.Module):
    """The onellm family's video tokenizer over an image tower: the tubelet embedding started from the tower's own
    patch embedding (its 2-D kernel spread evenly over the tubelet's frames, I3D's inflation, so a still clip gives
    each frame's image tokens), the tower's class token, the tower's positions resampled to the frame's grid, and a
    learned position per time step (starting at zero) so the order of frames is visible. Frames are resized to
    `size` (default: 4 patches of the tower, 32 pixels for the embedded tower).
    (items, num_frames, 3, size, size) -> (items, 1 + (num_frames / tubelet) * (size / patch) ** 2, width)."""

    def __init__(self, universal, *, num_frames: int = 8, size: int | None = None, tubelet: int = 2):
        super().__init__()
        patch = universal.patch_size
        size = 4 * patch if size is None else size  # a 4 x 4 grid per time step, whatever the tower's patch
        check_tubelets(num_frames, size, tubelet, patch, "the tower's patch size")
        embeddings = universal._body().embeddings
        conv = embeddings.patch_embedding
        width = universal.hidden_size
        self.num_frames, self.size, self.tubelet, self.patch = num_frames, size, tubelet, patch
        self.mean, self.std = tuple(universal.mean), tuple(universal.std)
        self.hidden_size = width
        self.has_cls = universal.has_cls
        steps, grid = num_frames // tubelet, size // patch
        self.num_tokens = int(self.has_cls) + steps * grid**2
        self.proj = nn.Conv3d(
            3, width, (tubelet, patch, patch), stride=(tubelet, patch, patch), bias=conv.bias is not None
        )
        with torch.no_grad():
            self.proj.weight.copy_(conv.weight.unsqueeze(2).expand(-1, -1, tubelet, -1, -1) / tubelet)
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)
        table = embeddings.position_embedding.weight.detach()  # (cls? + g * g, width)
        cls_pos, spatial = table[: int(self.has_cls)], table[int(self.has_cls) :]
        g = int(round(len(spatial) ** 0.5))
        spatial = spatial.T.reshape(1, width, g, g)
        if g != grid:
            spatial = F.interpolate(spatial, size=(grid, grid), mode="bicubic", align_corners=False)
        self.pos = nn.Parameter(spatial.reshape(width, grid * grid).T.clone())  # (grid * grid, width)
        self.time = nn.Parameter(torch.zeros(steps, 1, width))
        if self.has_cls:
            self.cls = nn.Parameter((embeddings.class_embedding.detach() + cls_pos[0]).view(1, 1, width).clone())

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        expected = (self.num_frames, 3, self.size, self.size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video tokenizer expects (items, {', '.join(map(str, expected))}), got {video.shape}")
        x = self.proj(video.transpose(1, 2))  # (items, width, steps, grid, grid)
        x = x.flatten(3).permute(0, 2, 3, 1) + self.pos + self.time  # (items, steps, grid * grid, width)
        x = x.flatten(1, 2)  # time-major
        if self.has_cls:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
        return x


def video_tokenizer(universal, settings: dict) -> nn.Module:
    """Over an image tower (the onellm family's universal encoder): `TowerVideoTokenizer`, settings num_frames,
    size, tubelet (the patch is the tower's). Otherwise (e.g. inside the projector family's modality transformer):
    a fresh `VideoTokenizer`."""
    if hasattr(universal, "_body"):
        return TowerVideoTokenizer(universal, **settings)
    return VideoTokenizer(universal.hidden_size, **settings)


# ---- the embedded "moving shapes" clips ----------------------------------------------------------------------

FRAMES, SIDE = 8, 32
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slow": 1, "fast": 3}  # pixels per frame
# One fixed palette (32 light greys, 8 shades of each colour) so the GIF is lossless: what `make` returns is
# exactly what `load` reads back, and the colours never drift in quantisation.
GREYS = np.arange(160, 256, 3)
SHADES = np.linspace(-24, 24, 8)
PALETTE = np.concatenate(
    [np.repeat(GREYS[:, None], 3, 1)]
    + [np.clip(np.array(rgb)[None] + SHADES[:, None], 0, 255) for rgb in COLORS.values()]
).astype(np.uint8)  # (32 + 4 * 8, 3)

QUESTIONS = {
    "direction": ["which way does the shape move ?", "what direction is it moving in ?", "where is the shape going ?"],
    "speed": ["is the shape slow or fast ?", "how fast does it move ?", "what is the speed of the shape ?"],
    "shape": ["what shape is moving ?", "what shape is it ?", "which shape do you see ?"],
    "color": ["what color is the shape ?", "what colour is the moving object ?", "which color do you see ?"],
}
CAPTION_PREFIXES = ["", "a video of ", "a clip of ", "there is "]


def _shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float64)  # pixel centres on integer coordinates
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # an upright triangle: the apex at the top, the base at the bottom, both `half` from the centre
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)


def synth_video(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """One clip (8, 32, 32, 3) uint8 of a shape moving in a straight line, and its four answers."""
    answers = {
        "direction": rng.choice(list(DIRECTIONS)),
        "speed": rng.choice(list(SPEEDS)),
        "shape": rng.choice(SHAPES),
        "color": rng.choice(list(COLORS)),
    }
    g = np.random.default_rng(rng.randrange(2**32))
    half = g.uniform(4.0, 5.0)  # at most 5: a fast clip travels 21 of the 32 pixels
    (ux, uy), step = DIRECTIONS[answers["direction"]], SPEEDS[answers["speed"]]
    lo, hi, travel = half, SIDE - 1 - half, step * (FRAMES - 1)
    # Start so that the whole path stays inside the frame: fast clips (21 pixels of travel) leave little room.
    along = g.uniform(lo, hi - travel) if ux + uy > 0 else g.uniform(lo + travel, hi)
    across = g.uniform(lo, hi)
    x0, y0 = (along, across) if ux else (across, along)
    level = g.uniform(175, 235)
    first_shade = len(GREYS) + len(SHADES) * list(COLORS).index(answers["color"])
    index = np.empty((FRAMES, SIDE, SIDE), np.uint8)  # palette indices
    for t in range(FRAMES):
        noise = level + g.normal(0, 10, (SIDE, SIDE))  # fresh noise each frame: no two frames are identical
        index[t] = np.clip(np.rint((noise - GREYS[0]) / 3), 0, len(GREYS) - 1)
        mask = _shape_mask(answers["shape"], x0 + ux * step * t, y0 + uy * step * t, half)
        index[t][mask] = first_shade + g.integers(0, len(SHADES), int(mask.sum()))
    return PALETTE[index], answers


def save_gif(frames: np.ndarray, path: str | Path, duration_ms: int = 100) -> None:
    """Write (frames, H, W, 3) uint8 as an animated GIF with one shared palette: exact when the clip has at most
    256 colours, else the palette comes from one quantisation of all frames together."""
    frames = _check_frames(np.asarray(frames), str(path))
    if any(np.array_equal(a, b) for a, b in zip(frames[:-1], frames[1:], strict=True)):
        # The GIF writer merges identical consecutive frames into one, which would change the frame count.
        raise ValueError(f"{path}: a GIF cannot keep identical consecutive frames")
    t, h, w, _ = frames.shape
    colors, inverse = np.unique(frames.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colors) <= 256:
        index, palette = inverse.reshape(t, h, w).astype(np.uint8), colors
    else:
        mosaic = Image.fromarray(frames.reshape(t * h, w, 3), "RGB").quantize(256)  # frames stacked vertically
        index = np.asarray(mosaic).reshape(t, h, w)
        palette = np.asarray(mosaic.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    images = []
    for frame in index:
        img = Image.fromarray(frame, "P")
        img.putpalette(palette.astype(np.uint8).tobytes())
        images.append(img)
    # disposal 1 (keep): every frame is a full picture, so nothing needs restoring between frames.
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration_ms,
        loop=0,
        disposal=1,
        optimize=False,
    )


def video_caption(answers: dict[str, str], rng: random.Random) -> str:
    a = answers
    return f"{rng.choice(CAPTION_PREFIXES)}a {a['speed']} {a['color']} {a['shape']} moving {a['direction']}"


VIDEO = register_modality(
    Modality(
        name="video",
        placeholder="<video>",
        record_key="video",
        default_encoder="modality-transformer",
        load=load_video,
        preprocess=preprocess_video,
        tokenizer=video_tokenizer,
        synthetic=Synthetic(make=synth_video, save=save_gif, suffix=".gif", questions=QUESTIONS, caption=video_caption),
    )
)
