"""The audio modality: load and validate a waveform, turn it into a log-magnitude spectrogram of a fixed length,
its default encoder (a small Transformer over spectrogram frames), and the embedded "shapes" sounds (a scene's
colour sets the pitch, its shape the waveform, its count the number of beeps, its size the loudness)."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.modalities.base import MediaError, Modality, register_modality
from mmalign.registry import register_encoder

SAMPLE_RATE = 8000
PITCH = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0, "purple": 770.0, "orange": 880.0}
LOUDNESS = {"small": 0.4, "large": 0.9}


def load_audio(source: str | Path | np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A mono float waveform (samples,) from a 16-bit PCM WAV path or a 1-D array; other rates are an error."""
    if isinstance(source, np.ndarray):
        if source.ndim != 1:
            raise MediaError(f"audio array must be 1-D, got shape {source.shape}")
        if not np.isfinite(source).all():
            raise MediaError("audio array holds NaN or infinite values")
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


class AudioEncoder(nn.Module):
    """Spectrogram frames -> a small Transformer: (B, frames, bins) -> (B, frames, dim).

    `seconds` fixes the clip length the processor crops or pads to, so every clip gives `num_tokens` frames."""

    def __init__(
        self,
        *,
        n_bins: int = 129,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        max_frames: int = 64,
        seconds: float = 0.6,
        sample_rate: int = SAMPLE_RATE,
        hop: int = 128,
    ):
        super().__init__()
        self.settings = dict(n_bins=n_bins, dim=dim, depth=depth, heads=heads, max_frames=max_frames,
                             seconds=seconds, sample_rate=sample_rate, hop=hop)  # fmt: skip
        self.hidden_size = dim
        self.sample_rate, self.hop, self.n_fft = sample_rate, hop, 2 * (n_bins - 1)
        self.num_samples = int(round(seconds * sample_rate))
        self.num_tokens = 1 + self.num_samples // hop  # torch.stft with center=True
        if self.num_tokens > max_frames:
            raise ValueError(f"{seconds} s gives {self.num_tokens} frames, more than max_frames={max_frames}")
        self.inp = nn.Linear(n_bins, dim)
        self.pos = nn.Parameter(torch.zeros(max_frames, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = self.inp(spec) + self.pos[: spec.shape[1]]  # (B, frames, dim)
        return self.blocks(x)

    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audio_encoder.json").write_text(json.dumps(self.settings))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / "model.safetensors")


PRESETS = {"tiny-audio": dict(dim=64, depth=2, heads=4)}


@register_encoder("audio-transformer")
def audio_encoder(*, path=None, preset=None, config=None, **_) -> AudioEncoder:
    """From a folder written by `AudioEncoder.save`, or fresh from a preset and config keys."""
    if path:
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "audio_encoder.json").is_file():
            raise FileNotFoundError(f"{folder} holds no audio_encoder.json (written by AudioEncoder.save)")
        encoder = AudioEncoder(**json.loads((folder / "audio_encoder.json").read_text()))
        encoder.load_state_dict(load_file(str(folder / "model.safetensors")))
        return encoder
    if preset and preset not in PRESETS:
        raise KeyError(f"unknown audio encoder preset {preset!r}; known: {sorted(PRESETS)}")
    return AudioEncoder(**{**PRESETS.get(preset or "", {}), **(config or {})})


def preprocess_audio(wave_: torch.Tensor, encoder) -> torch.Tensor:
    """A waveform cropped or zero-padded to the encoder's clip length, as spectrogram frames: (frames, bins)."""
    n = encoder.num_samples
    wave_ = wave_[:n] if wave_.shape[0] >= n else torch.nn.functional.pad(wave_, (0, n - wave_.shape[0]))
    return spectrogram(wave_, encoder.n_fft, encoder.hop)[0]


class SpectrogramTokenizer(nn.Module):
    """The onellm family's audio tokenizer: each spectrogram frame becomes one token of the universal encoder's
    width, after a learned class token, with learned positions. (items, frames, bins) -> (items, 1 + frames, width).
    `seconds` fixes the clip length the processor crops or pads to."""

    def __init__(self, width: int, *, seconds: float = 0.6, sample_rate: int = SAMPLE_RATE, n_fft: int = 256,
                 hop: int = 128):  # fmt: skip
        super().__init__()
        self.sample_rate, self.n_fft, self.hop = sample_rate, n_fft, hop
        self.num_samples = int(round(seconds * sample_rate))
        self.num_tokens = 2 + self.num_samples // hop  # the class token + torch.stft's frames (center=True)
        self.hidden_size = width
        self.proj = nn.Linear(n_fft // 2 + 1, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = self.proj(spec)  # (items, frames, width)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


def audio_tokenizer(universal, settings: dict) -> SpectrogramTokenizer:
    return SpectrogramTokenizer(universal.hidden_size, **settings)


AUDIO = register_modality(
    Modality(
        name="audio",
        placeholder="<audio>",
        record_key="audio",
        default_encoder="audio-transformer",
        load=load_audio,
        preprocess=preprocess_audio,
        tokenizer=audio_tokenizer,
    )
)
