"""The signal modality: a generic multichannel time series, float (channels, time), such as fMRI region-of-interest
time courses (as OneLLM's NSD fMRI input), EEG or any sensor array.

Loads `.npy` arrays (C, T), or (T,) for a single channel; `.csv` files with one row per time point and one column
per channel (an optional header row of channel names is skipped); NPY or CSV bytes; and in-memory arrays.
Preprocessing crops or zero-pads the channels to `channels` and the time axis to `length` (keeping the start, where
a task-locked epoch begins) and z-scores each channel, so the tokenizer sees shapes, not a scanner's units. The
tokenizer makes one token per channel: a linear map of its time course (OneLLM maps fMRI voxels linearly too) plus
a learned channel embedding, after a class token.

The embedded task: 16 channels x 32 time points, the channels grouped into four regions of four (visual, auditory,
motor, memory). One region carries a task-locked haemodynamic response (a smooth bump with a small undershoot)
that peaks early (first half) or late (second half), over noise shared across channels, private noise and slow
drift, with a random baseline and scale per channel. Saved as .npy."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.modalities.base import (
    MediaError,
    Modality,
    Synthetic,
    is_number,
    load_npy,
    register_modality,
    require_file,
)

CHANNELS, LENGTH = 16, 32
REGIONS = ("visual", "auditory", "motor", "memory")  # channels 0-3, 4-7, 8-11, 12-15
TIMINGS = ("early", "late")
QUESTIONS = {
    "region": ["which region responds ?", "which region is active ?", "where is the response ?"],
    "timing": ["is the response early or late ?", "when does the response peak ?", "does it peak early or late ?"],
}
# What a file that is not a signal usually starts with, so the error can say what was given instead.
_OTHER_KINDS = {
    b"RIFF": "a WAV audio file",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"ply": "a PLY point cloud",
}


def _check_signal(values: np.ndarray, name: str) -> np.ndarray:
    """(C, T) or (T,) finite numbers -> (C, T) float32."""
    if values.dtype.kind not in "iuf":
        raise MediaError(f"{name}: a signal must be numeric, got dtype {values.dtype}")
    if values.ndim == 1:
        values = values[None]  # one channel
    if values.ndim != 2:
        raise MediaError(
            f"{name}: a signal must be (channels, time) or (time,), got a {values.ndim}-D array {values.shape}"
        )
    if values.size == 0:
        raise MediaError(f"{name}: empty signal, shape {values.shape}")
    if np.isnan(values).any():
        c, t = np.argwhere(np.isnan(values))[0]
        raise MediaError(f"{name}: NaN in signal (channel {c}, time {t})")
    if not np.isfinite(values).all():
        c, t = np.argwhere(~np.isfinite(values))[0]
        raise MediaError(f"{name}: infinite value in signal (channel {c}, time {t})")
    return np.ascontiguousarray(values, dtype=np.float32)


def _parse_csv(data: bytes, name: str) -> np.ndarray:
    """Rows are time points, columns channels -> (T, C) float64; rows are named by their line in the file."""
    if b"\x00" in data[:4096]:
        raise MediaError(f"{name}: not a signal CSV (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MediaError(f"{name}: not a signal CSV (not UTF-8 text)") from err
    reader = csv.reader(io.StringIO(text))
    rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    if rows and not any(is_number(c) for c in rows[0][1]):
        rows.pop(0)  # a header of channel names
    if not rows:
        raise MediaError(f"{name}: empty signal (no rows of numbers)")
    width = len(rows[0][1])
    values = np.empty((len(rows), width))
    for i, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise MediaError(f"{name}: row {line} has {len(cells)} columns, the first has {width}")
        for j, cell in enumerate(cells):
            try:
                values[i, j] = float(cell)
            except ValueError as err:
                raise MediaError(f"{name}: row {line}: not numeric: {cell!r}") from err
    return values


def _load_npy(data: bytes, name: str) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):
        kind = next((k for magic, k in _OTHER_KINDS.items() if data.startswith(magic)), "not a NumPy array")
        raise MediaError(f"{name}: not a .npy signal ({kind})")
    return load_npy(data, name, ".npy signal")


def load_signal(source: str | Path | bytes | np.ndarray | torch.Tensor) -> np.ndarray:
    """A signal (channels, time) float32 from a .npy or .csv path, NPY or CSV bytes (told apart by content), or
    an array (C, T) / (T,). A CSV's rows are time points and its columns channels."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _check_signal(source, "signal array")
    if isinstance(source, bytes | bytearray):
        data, name = bytes(source), "<bytes>"
        values = _load_npy(data, name) if data.startswith(b"\x93NUMPY") else _parse_csv(data, name).T
        return _check_signal(values, name)
    if not isinstance(source, str | Path):
        raise MediaError(f"a signal must be a path, bytes or an array, got {type(source).__name__}")
    path = require_file(source, "signal")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise MediaError(f"{path}: unsupported signal format {suffix or '(no extension)'!r} (expected .npy or .csv)")
    data = path.read_bytes()
    values = _load_npy(data, str(path)) if suffix == ".npy" else _parse_csv(data, str(path)).T  # (T, C) -> (C, T)
    return _check_signal(values, str(path))


def preprocess_signal(raw: np.ndarray | torch.Tensor, encoder) -> torch.Tensor:
    """(C, T) -> (encoder.channels, encoder.length) float32: the first `channels` channels and `length` time
    points, each channel z-scored over its time course, zero-padded where the signal is smaller. A constant
    channel becomes zeros rather than a division by zero."""
    x = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    x = x[None] if x.ndim == 1 else x
    x = x[: encoder.channels, : encoder.length]  # (channels', length')
    mean, std = x.mean(1, keepdim=True), x.std(1, correction=0, keepdim=True)
    # Relative guard: float rounding on a constant channel gives a tiny std that would blow its noise up to O(1).
    flat = std <= 1e-6 * mean.abs().clamp_min(1.0)
    x = torch.where(flat, torch.zeros_like(x), (x - mean) / torch.where(flat, torch.ones_like(std), std))
    return nn.functional.pad(x, (0, encoder.length - x.shape[1], 0, encoder.channels - x.shape[0]))


class SignalTokenizer(nn.Module):
    """The onellm family's signal tokenizer: one token per channel, a linear map of its time course plus a learned
    channel embedding (the channel's identity plays the part of a position), after a learned class token.
    (items, channels, length) -> (items, 1 + channels, width)."""

    def __init__(self, width: int, *, channels: int = CHANNELS, length: int = LENGTH):
        super().__init__()
        for key, value in (("channels", channels), ("length", length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"the signal tokenizer's {key} must be a positive integer, got {value!r}")
        self.channels, self.length = channels, length
        self.hidden_size, self.num_tokens = width, 1 + channels
        self.proj = nn.Linear(length, width)
        self.channel_embed = nn.Parameter(torch.randn(channels, width) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x) + self.channel_embed  # (items, channels, width)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)


def signal_tokenizer(universal, settings: dict) -> SignalTokenizer:
    return SignalTokenizer(universal.hidden_size, **settings)


def _haemodynamic(t: np.ndarray, onset: float, rise: float) -> np.ndarray:
    """A gamma-shaped response peaking at 1 `rise` steps after `onset`, with a small, later undershoot."""

    def gamma(tau, peak, shape):
        tau = np.clip(tau, 0.0, None) / peak
        return tau**shape * np.exp(shape * (1.0 - tau))

    return gamma(t - onset, rise, 5.0) - 0.15 * gamma(t - onset, 2.5 * rise, 6.0)


def _ar1(g: np.random.Generator, rho: float, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance AR(1) noise along the last axis."""
    eps = g.normal(size=shape) * np.sqrt(1 - rho**2)
    out = np.empty(shape)
    out[..., 0] = g.normal(size=shape[:-1])
    for k in range(1, shape[-1]):
        out[..., k] = rho * out[..., k - 1] + eps[..., k]
    return out


def synth_signal(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """(16, 32) float32 and its answers (region, timing). The response is 3-5 times the background's standard
    deviation, so after per-channel z-scoring its four channels are bump-shaped while the others stay noise."""
    answers = {"region": rng.choice(REGIONS), "timing": rng.choice(TIMINGS)}
    g = np.random.default_rng(rng.randrange(2**32))
    t = np.arange(LENGTH, dtype=np.float64)
    shared = _ar1(g, 0.9, (1, LENGTH)) * g.uniform(0.2, 0.6, (CHANNELS, 1))  # a global slow fluctuation
    private = _ar1(g, 0.4, (CHANNELS, LENGTH)) * g.uniform(0.6, 1.0, (CHANNELS, 1))
    ramp = (t / (LENGTH - 1) - 0.5)[None]
    drift = g.uniform(-0.8, 0.8, (CHANNELS, 1)) * ramp + 0.4 * np.sin(
        2 * np.pi * t[None] / g.uniform(48, 96, (CHANNELS, 1)) + g.uniform(0, 2 * np.pi, (CHANNELS, 1))
    )
    x = shared + private + drift
    rise = g.uniform(3.5, 5.0)
    peak = g.uniform(6, 11) if answers["timing"] == "early" else g.uniform(20, 25)
    first = 4 * REGIONS.index(answers["region"])
    x[first : first + 4] += g.uniform(3, 5) * g.uniform(0.8, 1.2, (4, 1)) * _haemodynamic(t, peak - rise, rise)[None]
    x = x * g.uniform(0.5, 2.0, (CHANNELS, 1)) + g.normal(0, 10, (CHANNELS, 1))  # units and baseline per channel
    return x.astype(np.float32), answers


def save_signal(raw: np.ndarray, path: str | Path) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to another suffix
        np.save(f, np.asarray(raw, dtype=np.float32))


def signal_caption(answers: dict[str, str], rng: random.Random) -> str:
    region, timing = answers["region"], answers["timing"]
    article = "an" if timing == "early" else "a"
    return rng.choice(
        [
            f"{article} {timing} response in the {region} region",
            f"the {region} region responds {timing}",
            f"{region} channels peak {timing}",
        ]
    )


SIGNAL = register_modality(
    Modality(
        name="signal",
        placeholder="<signal>",
        record_key="signal",
        default_encoder="modality-transformer",
        load=load_signal,
        preprocess=preprocess_signal,
        tokenizer=signal_tokenizer,
        synthetic=Synthetic(
            make=synth_signal, save=save_signal, suffix=".npy", questions=QUESTIONS, caption=signal_caption
        ),
    )
)
