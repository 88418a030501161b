"""What a modality is: its placeholder, its record key, how a raw input loads and becomes a tensor, and its
default encoder. Each modality is one file that registers one `Modality`; processor, collator, model, generation
and evaluation look modalities up here and never name one themselves."""

from __future__ import annotations

import io
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmalign.config import MediaLimits
from mmalign.registry import Registry


class MediaError(ValueError):
    """A media input that cannot be used (missing, unreadable, wrong kind, over a size limit)."""


# The loaders read the limits from here rather than from an argument: `Modality.load(source)` is called from many
# places (processor, pairs, few-shot) that hold no config. `processor_for` sets them from data.limits; DataLoader
# workers, forked after it, inherit them.
_limits: MediaLimits | None = None


def set_limits(limits: MediaLimits | None) -> None:
    """Use `limits` in every loader from now on; None restores the defaults."""
    global _limits
    _limits = limits


def current_limits() -> MediaLimits:
    """The limits the loaders apply: the last `set_limits`, else MediaLimits' defaults."""
    return _limits if _limits is not None else MediaLimits()


def check_limit(name: str, amount: float, key: str, what: str) -> None:
    """MediaError naming the file and the data.limits key when `amount` is over that limit (`what` describes
    the amount, e.g. "30000x30000 pixels")."""
    limit = getattr(current_limits(), key)
    if amount > limit:
        raise MediaError(f"{name}: {what} exceed data.limits.{key}={limit}; raise the limit if this input is wanted")


def open_image(source: Path | io.BytesIO, name: str) -> Image.Image:
    """A PIL image with only its header read (no pixels decoded yet), within data.limits.max_image_pixels.

    PIL's own decompression-bomb guard runs inside `Image.open`: its warning (past Image.MAX_IMAGE_PIXELS) is
    silenced because our limit is checked right after from the header, and its error (past twice that, raised
    before the size can be read) becomes the same message naming our limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as err:
            claimed = re.search(r"\((\d+) pixels\)", str(err))
            pixels = int(claimed.group(1)) if claimed else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
            check_limit(name, pixels, "max_image_pixels", f"{pixels} pixels")
            raise MediaError(f"{name}: {err} (PIL's guard, PIL.Image.MAX_IMAGE_PIXELS, is below our limit)") from err
    width, height = img.size
    try:
        check_limit(name, width * height, "max_image_pixels", f"{width}x{height} pixels")
    except MediaError:
        img.close()
        raise
    return img


def require_file(source: str | Path, kind: str) -> Path:
    """`source` as a Path to an existing file, else MediaError "<kind> file not found"."""
    path = Path(source)
    if not is_file(path, kind):
        raise MediaError(f"{kind} file not found: {path}")
    return path


def is_file(path: Path, kind: str) -> bool:
    """`path.is_file()`, but a name the OS refuses (too long, ...) is a MediaError: pathlib raises OSError for it."""
    try:
        return path.is_file()
    except OSError as err:
        raise MediaError(f"{kind} path refused by the OS ({err.strerror}): {shorten(str(path))}") from err


def shorten(text: str, limit: int = 120) -> str:
    """`text`, cut in the middle past `limit` characters, so a junk value cannot flood a message."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(text)} characters)"


def read_bytes(source: str | Path | bytes, kind: str) -> tuple[bytes, str]:
    """(content, name for messages) of bytes ("<bytes>") or of a file path that must exist."""
    if isinstance(source, bytes):
        return source, "<bytes>"
    path = require_file(source, kind)
    return path.read_bytes(), str(path)


def load_npy(source: bytes | Path | io.BytesIO, name: str, what: str) -> np.ndarray:
    """One array from NPY bytes, a path or a buffer, without pickles, else MediaError "<name>: unreadable <what>"."""
    try:
        array = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise MediaError(f"{name}: unreadable {what}: {err}") from err
    if not isinstance(array, np.ndarray):
        raise MediaError(f"{name}: expected one array, got {type(array).__name__}")
    return array


def is_number(cell: str) -> bool:
    """Whether a CSV cell parses as a float."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


def detail_convs(channels: int, tokenizer: str) -> list[nn.Module]:
    """Two 3x3 convolutions with GELU over a one-channel map at its own resolution, (items, 1, H, W) ->
    (items, channels, H, W): the local pattern a patch or frame token is too coarse to see (a corner on a depth map,
    a tone's slope on a spectrogram). The modules of a tokenizer's detail branch, before its own pooling;
    `channels` is the tokenizer's `detail_channels`."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{tokenizer}: detail_channels must be an integer >= 0, got {channels!r}")
    return [nn.Conv2d(1, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU()]


@dataclass(frozen=True)
class Synthetic:
    """A modality's procedural generator for the embedded data: one random item with the answers it determines.

    `make(rng) -> (raw, answers)`: a raw item (what `save` writes and `load` reads back) and {question type:
    one-word answer}. `save(raw, path)` writes it as a real file named with `suffix` (".gif", ".wav", ".npy").
    `questions` holds a few phrasings per question type; `caption(answers, rng)` a one-line description."""

    make: Callable[[random.Random], tuple[Any, dict[str, str]]]
    save: Callable[[Any, Path], None]
    suffix: str
    questions: dict[str, list[str]]
    caption: Callable[[dict[str, str], random.Random], str]


@dataclass(frozen=True)
class Modality:
    """`load(source) -> raw` validates a path, bytes or array; `preprocess(raw, encoder) -> tensor` makes one
    item's model input with the encoder's own settings (size, normalisation, sample rate). Items of one modality
    stack along a new first dimension, so every item of a modality must come out the same shape."""

    name: str
    placeholder: str  # the text marker, expanded by the processor into one token per encoder feature
    record_key: str  # the key of a LLaVA-style record that holds this modality's path or list of paths
    default_encoder: str  # ENCODERS entry used when a recipe names the modality without an encoder
    load: Callable[[Any], Any]
    preprocess: Callable[[Any, Any], torch.Tensor]
    # The onellm family's lightweight tokenizer: `tokenizer(universal_encoder, settings) -> module` turning
    # preprocessed items (items, ...) into tokens of the universal encoder's width (items, num_tokens, width).
    # The module carries the attributes `preprocess` reads, as an encoder would. None: no onellm support.
    tokenizer: Callable[[Any, dict], Any] | None = None
    # The embedded data's generator (captions and question-answer conversations); None: no synthetic data.
    synthetic: Synthetic | None = field(default=None, compare=False)

    def resolve(self, source: Any, folder: str | Path = "") -> Any:
        """A record's relative path resolved against the media folder; arrays and bytes pass through."""
        return Path(folder) / source if isinstance(source, str) else source


MODALITIES = Registry("modality")


def register_modality(modality: Modality) -> Modality:
    MODALITIES.register(modality.name)(modality)
    return modality


def get_modality(name: str) -> Modality:
    import mmalign.modalities  # noqa: F401  (registers the built-in modalities)

    return MODALITIES.get(name)
