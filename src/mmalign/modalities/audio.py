"""The audio modality: load and validate a waveform, turn it into a log-magnitude spectrogram, and synthesise the
embedded "shapes" sounds (a scene's colour sets the pitch, its shape the waveform, its count the number of beeps,
its size the loudness)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch

from mmalign.modalities.image import MediaError

SAMPLE_RATE = 8000
PITCH = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0, "purple": 770.0, "orange": 880.0}
LOUDNESS = {"small": 0.4, "large": 0.9}


def load_audio(source: str | Path | np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A mono float waveform (samples,) from a 16-bit PCM WAV path or a 1-D array; other rates are an error."""
    if isinstance(source, np.ndarray):
        if source.ndim != 1:
            raise MediaError(f"audio array must be 1-D, got shape {source.shape}")
        return torch.from_numpy(source.astype(np.float32))
    path = Path(source)
    if not path.is_file():
        raise MediaError(f"audio file not found: {path}")
    try:
        with wave.open(str(path)) as f:
            if f.getframerate() != sample_rate or f.getsampwidth() != 2:
                raise MediaError(f"{path}: need 16-bit PCM at {sample_rate} Hz, got {f.getframerate()} Hz")
            data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).reshape(-1, f.getnchannels())
    except (wave.Error, EOFError) as err:
        raise MediaError(f"unreadable audio {path}: {err}") from err
    return torch.from_numpy(data.mean(1).astype(np.float32) / 32768.0)


def spectrogram(wave_: torch.Tensor, n_fft: int = 256, hop: int = 128) -> torch.Tensor:
    """(samples,) or (B, samples) -> (B, frames, n_fft // 2 + 1) log-magnitude STFT frames."""
    x = wave_ if wave_.ndim == 2 else wave_.unsqueeze(0)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)
    return torch.log1p(spec.abs()).transpose(1, 2)  # (B, frames, bins)


def synth_scene_audio(scene: dict, rng: np.random.Generator, seconds: float = 0.6) -> np.ndarray:
    """The sound of a scene: `count` beeps of the colour's pitch in the shape's waveform."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    freq = PITCH[scene["color"]] * rng.uniform(0.98, 1.02)
    phase = (freq * t) % 1.0
    carrier = {
        "circle": np.sin(2 * np.pi * phase),
        "square": np.sign(np.sin(2 * np.pi * phase)),
        "triangle": 4 * np.abs(phase - 0.5) - 1,
        "diamond": 2 * phase - 1,  # sawtooth
    }[scene["shape"]]
    envelope = np.zeros_like(t)
    slot = seconds / 3
    for i in range(scene["count"]):
        on = (t >= i * slot + 0.02) & (t < i * slot + slot * 0.7)
        envelope[on] = 1.0
    noise = rng.normal(0, 0.02, t.shape)
    return (LOUDNESS[scene["size"]] * envelope * carrier + noise).astype(np.float32)
