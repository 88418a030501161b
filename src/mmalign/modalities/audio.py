"""The audio modality: load and validate a waveform (WAV, FLAC or OGG at any rate, bit depth and channel count,
mixed down to mono and resampled), turn it into spectrogram frames of a fixed length (linear log-magnitude for
the audio encoder, log-mel for the onellm tokenizer), the audio encoder (a small Transformer over spectrogram
frames), and two synthetic sound sets: the "shapes" scene sounds (a scene's colour sets the pitch, its shape the
waveform, its count the number of beeps, its size the loudness) and the modality's own tones, whose questions
are the pitch (low, middle, high), the number of beeps (one, two, three) and the glide (rising, falling, steady)."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.modalities.base import (
    MediaError,
    Modality,
    Synthetic,
    check_limit,
    detail_convs,
    register_modality,
    require_file,
)
from mmalign.registry import register_encoder

SAMPLE_RATE = 8000
PITCH = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0, "purple": 770.0, "orange": 880.0}
LOUDNESS = {"small": 0.4, "large": 0.9}

# What a file that is not audio usually starts with, so the error can say what was given instead.
_OTHER_KINDS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x93NUMPY": "a NumPy array",
    b"ply": "a PLY point cloud",
    b"PK\x03\x04": "a zip archive",
}


def _array_to_mono(data: np.ndarray, name: str, from_file: bool = False) -> np.ndarray:
    """(samples,) or (samples, channels) of any numeric dtype -> (samples,) float32 in the file's scale."""
    if data.dtype.kind not in "iuf":
        raise MediaError(f"{name}: audio must be numeric, got dtype {data.dtype}")
    if data.dtype.kind in "iu":  # integer PCM: full scale is the dtype's range, as soundfile reads files
        info = np.iinfo(data.dtype)
        data = (data.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    if data.ndim in (1, 2) and data.shape[0] == 0:
        raise MediaError(f"{name}: empty audio (no samples)")
    if data.ndim == 2:
        # A (channels, samples) array passed by mistake would otherwise be "mixed" into a few garbage samples.
        if not from_file and (data.shape[1] > 32 or data.shape[1] >= data.shape[0]):
            raise MediaError(f"{name}: a 2-D audio array must be (samples, channels), got shape {data.shape}")
        data = data.mean(1)
    elif data.ndim != 1:
        raise MediaError(f"{name}: audio must be (samples,) or (samples, channels), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise MediaError(f"{name}: audio holds NaN or infinite values")
    return data.astype(np.float32)


def _truncation(head: bytes, size: int) -> str | None:
    """For a RIFF/WAVE file: a reason when its data chunk claims more bytes than the file holds (libsndfile then
    reads what is there without complaint). Streaming writers leave 0 or 0xFFFFFFFF as the size: not an error."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            if length not in (0, 0xFFFFFFFF) and pos + 8 + length > size:
                return f"truncated WAV (data chunk of {length} bytes, {size - pos - 8} present)"
            return None
        pos += 8 + length + (length & 1)  # chunks are word-aligned
    return None


def _read_file(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Encoded audio bytes -> ((frames, channels) float32, sample rate)."""
    try:
        import soundfile
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("reading audio files needs soundfile: pip install soundfile") from err
    if not data:
        raise MediaError(f"unreadable audio {name}: the file is empty")
    for magic, kind in _OTHER_KINDS.items():
        if data.startswith(magic):
            raise MediaError(f"unreadable audio {name}: it is {kind}, not audio")
    reason = _truncation(data[:4096], len(data))
    if reason:
        raise MediaError(f"unreadable audio {name}: {reason}")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            # The header gives the length: a clip over data.limits.max_audio_seconds fails before it is decoded.
            seconds = f.frames / f.samplerate
            check_limit(name, seconds, "max_audio_seconds", f"{seconds:.1f} seconds of audio")
            samples, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except MediaError:
        raise
    except (RuntimeError, ValueError, TypeError) as err:  # soundfile's errors derive from RuntimeError
        raise MediaError(f"unreadable audio {name}: {err}") from err
    return samples, int(rate)


def load_audio(source: str | Path | bytes | np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A mono float waveform (samples,) at `sample_rate`.

    From a path or the bytes of a WAV (any rate, 8/16/24/32-bit PCM or float, any channel count), FLAC or OGG
    file: channels are averaged and the result resampled to `sample_rate` (band-limited, see `resample`). From an
    array (samples,) or (samples, channels), taken to be at `sample_rate` already; integer arrays are scaled to
    [-1, 1) as PCM."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return torch.from_numpy(_array_to_mono(source, "audio array"))
    if isinstance(source, bytes | bytearray):
        name, data = "<bytes>", bytes(source)
    elif isinstance(source, str | Path):
        path = require_file(source, "audio")
        name, data = str(path), path.read_bytes()
    else:
        raise MediaError(f"audio must be a path, bytes or an array, got {type(source).__name__}")
    samples, rate = _read_file(data, name)
    wave_ = torch.from_numpy(_array_to_mono(samples, name, from_file=True))
    return resample(wave_, rate, sample_rate) if rate != sample_rate else wave_


def resample(wave_: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """(..., samples) at `orig_rate` -> (..., round(samples * new_rate / orig_rate)) at `new_rate`.

    Band-limited through the FFT: the spectrum is cut (downsampling) or zero-extended (upsampling) at the lower
    Nyquist frequency, an ideal low-pass filter, so nothing aliases."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return wave_
    n = wave_.shape[-1]
    n_out = max(1, round(n * new_rate / orig_rate))
    # Zero padding keeps the filter's circular wrap from folding the clip's end onto its start; padding to a
    # multiple of orig/gcd makes the rate ratio exact (when that multiple is not absurdly long).
    step = orig_rate // math.gcd(orig_rate, new_rate)
    padded = n + n // 4 + 256
    if step <= padded:
        padded = -(-padded // step) * step
    m = round(padded * new_rate / orig_rate)
    spec = torch.fft.rfft(wave_.double(), padded)  # (..., padded // 2 + 1)
    out = spec.new_zeros(*spec.shape[:-1], m // 2 + 1)
    keep = min(spec.shape[-1], out.shape[-1])
    out[..., :keep] = spec[..., :keep]
    if m < padded and m % 2 == 0:
        out[..., m // 2] = 0  # the new Nyquist bin cannot tell +f from -f: drop it rather than alias
    if m > padded and padded % 2 == 0:
        out[..., padded // 2] *= 0.5  # the old Nyquist bin stood for +f and -f at once; irfft mirrors it
    return (torch.fft.irfft(out, m) * (m / padded))[..., :n_out].to(wave_.dtype)


def spectrogram(wave_: torch.Tensor, n_fft: int = 256, hop: int = 128) -> torch.Tensor:
    """(samples,) or (B, samples) -> (B, frames, n_fft // 2 + 1) log-magnitude STFT frames."""
    x = wave_ if wave_.ndim == 2 else wave_.unsqueeze(0)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)
    return torch.log1p(spec.abs()).transpose(1, 2)  # (B, frames, bins)


def hz_to_mel(freq):
    """The HTK mel scale (as librosa's htk=True and torchaudio's default)."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale, unnormalised (peak 1), as librosa's
    `filters.mel(htk=True, norm=None)` and torchaudio's `melscale_fbanks`: filter m rises from the (m)th to the
    (m+1)th of n_mels + 2 points evenly spaced in mel between f_min and f_max, and falls to the (m+2)th.
    `power_spectrum @ filterbank` gives mel energies."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if n_mels < 1:
        raise ValueError(f"n_mels must be at least 1, got {n_mels}")
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # each STFT bin's frequency
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)  # (n_mels + 1,)
    offsets = edges[None, :] - freqs[:, None]  # (bins, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))  # (bins, n_mels)
    if (bank.max(0) == 0).any():
        raise ValueError(
            f"{n_mels} mel filters are too narrow for n_fft={n_fft} at {sample_rate} Hz: some cover no STFT bin "
            "(use fewer mels or a larger n_fft)"
        )
    return torch.from_numpy(bank.astype(np.float32))


def log_mel(
    wave_: torch.Tensor, n_fft: int = 256, hop: int = 128, n_mels: int = 64, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """(samples,) or (B, samples) -> (B, frames, n_mels): log(mel energy + 1e-6) of the Hann-windowed power
    STFT (torch.stft, center=True, so frames = 1 + samples // hop). The 1e-6 floor (-13.8) bounds silence."""
    x = wave_ if wave_.ndim == 2 else wave_.unsqueeze(0)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft).to(x), return_complex=True)
    power = spec.abs().pow(2).transpose(1, 2)  # (B, frames, bins)
    return torch.log(power @ mel_filterbank(n_fft, n_mels, sample_rate).to(power) + 1e-6)


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


# The modality's own synthetic tones: each beep glides about an octave around its centre frequency (or holds it).
TONE_SECONDS = 0.6
TONE_PITCH = {"low": 300.0, "middle": 600.0, "high": 1200.0}  # an octave apart, so +-10% jitter never overlaps
TONE_BEEPS = {"one": 1, "two": 2, "three": 3}
TONE_SWEEP = {"rising": 1.0, "falling": -1.0, "steady": 0.0}
TONE_QUESTIONS = {
    "pitch": ["what pitch is the tone ?", "is the tone low , middle or high ?", "how high is the sound ?"],
    "beeps": ["how many beeps are there ?", "how many beeps do you hear ?", "how many times does it beep ?"],
    "sweep": ["does the pitch rise , fall or stay ?", "how does the pitch move ?", "which way does the tone glide ?"],
}


def synth_tone(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """0.6 s at 8 kHz, float32 (samples,): one to three beeps of 90-120 ms at random times, each at the pitch's
    frequency (+-10%) in its middle and gliding 0.8-1.2 octaves up or down across the beep (or holding), with
    random phase, gain and background noise. The answers: pitch, beeps, sweep."""
    answers = {"pitch": rng.choice(list(TONE_PITCH)), "beeps": rng.choice(list(TONE_BEEPS)),
               "sweep": rng.choice(list(TONE_SWEEP))}  # fmt: skip
    np_rng = np.random.default_rng(rng.randrange(2**32))
    sr, n = SAMPLE_RATE, int(SAMPLE_RATE * TONE_SECONDS)
    count, centre = TONE_BEEPS[answers["beeps"]], TONE_PITCH[answers["pitch"]] * np_rng.uniform(0.9, 1.1)
    glide = TONE_SWEEP[answers["sweep"]] * np_rng.uniform(0.8, 1.2)  # octaves across one beep
    length = int(sr * np_rng.uniform(0.09, 0.12))
    min_gap, margin = int(0.06 * sr), int(0.02 * sr)
    spare = n - 2 * margin - count * length - (count - 1) * min_gap  # free time, split at random around the beeps
    shares = np.floor(np_rng.dirichlet(np.ones(count + 1)) * spare).astype(int)
    ramp = int(0.008 * sr)  # raised-cosine edges: no clicks, so a beep's onset is not a broadband burst
    edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    envelope = np.ones(length)
    envelope[:ramp], envelope[-ramp:] = edge, edge[::-1]
    tau = np.arange(length) / length
    freq = centre * 2.0 ** (glide * (tau - 0.5))  # geometric centre at `centre`, whatever the glide
    wave_ = np.zeros(n)
    start = margin + shares[0]
    for i in range(count):
        phase = np_rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(freq) / sr
        wave_[start : start + length] = envelope * np.sin(phase)
        start += length + min_gap + shares[i + 1]
    wave_ = np_rng.uniform(0.3, 0.9) * wave_ + np_rng.normal(0, np_rng.uniform(0.005, 0.03), n)
    return np.clip(wave_, -1, 1).astype(np.float32), answers


def save_audio(wave_: np.ndarray | torch.Tensor, path: str | Path, sample_rate: int = SAMPLE_RATE) -> None:
    """A mono waveform in [-1, 1] as a 16-bit PCM WAV (the format follows the suffix for .flac / .ogg)."""
    import soundfile

    subtype = "PCM_16" if Path(path).suffix.lower() == ".wav" else None
    soundfile.write(str(path), np.clip(np.asarray(wave_, dtype=np.float32), -1, 1), sample_rate, subtype=subtype)


def tone_caption(answers: dict[str, str], rng: random.Random) -> str:
    beeps = f"{answers['beeps']} {answers['pitch']} {answers['sweep']} beep" + (
        "s" if answers["beeps"] != "one" else ""
    )
    return rng.choice(["", "a sound of ", "you hear "]) + beeps


def clip_frames(seconds: float, sample_rate: int = SAMPLE_RATE, hop: int = 128) -> int:
    """Spectrogram frames of a clip of `seconds`: torch.stft with center=True gives 1 + samples // hop."""
    return 1 + int(round(seconds * sample_rate)) // hop


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
        self.num_tokens = clip_frames(seconds, sample_rate, hop)
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


def preprocess_audio(wave_: torch.Tensor | np.ndarray, encoder) -> torch.Tensor:
    """A waveform cropped or zero-padded to the encoder's clip length, as spectrogram frames: (frames, bins) of
    the linear log-magnitude STFT, or (frames, n_mels) log-mel when the encoder has `n_mels` > 0."""
    wave_ = torch.as_tensor(wave_, dtype=torch.float32)
    n = encoder.num_samples
    wave_ = wave_[:n] if wave_.shape[0] >= n else torch.nn.functional.pad(wave_, (0, n - wave_.shape[0]))
    if getattr(encoder, "n_mels", 0) > 0:
        return log_mel(wave_, encoder.n_fft, encoder.hop, encoder.n_mels, encoder.sample_rate)[0]
    return spectrogram(wave_, encoder.n_fft, encoder.hop)[0]


def glide_branch(channels: int) -> nn.Module:
    """(items, 1, frames, bands) -> (items, channels, frames): two 3x3 convolutions over the spectrogram, max-pooled
    over the bands. One frame's token sees its own bands only, so a tone gliding up and one gliding down differ only
    in how neighbouring tokens relate, which the frozen tower reads poorly: a linear probe on the tower's mean token
    told the embedded rising, falling and steady tones apart for 69-71% of held-out clips, and for 100% with this
    branch (benchmarks/probe_onellm.py). A 3x3 filter sees the glide's slope in one place."""
    return nn.Sequential(
        *detail_convs(channels, "audio tokenizer"),
        nn.AdaptiveMaxPool2d((None, 1)),  # over the bands: the slope, wherever the pitch is
        nn.Flatten(2),
    )


class SpectrogramTokenizer(nn.Module):
    """The onellm family's audio tokenizer: each spectrogram frame (n_mels log-mel bands, or the n_fft // 2 + 1
    linear bins when n_mels=0) becomes one token of the universal encoder's width, after a learned class token,
    with learned positions. (items, frames, bands) -> (items, 1 + frames, width). `seconds` fixes the clip length
    the processor crops or pads to. `detail_channels` > 0 adds `glide_branch` to each frame's token, through a
    projection that starts at zero (so the tokenizer starts as one without it, and earlier checkpoints load with 0)."""

    def __init__(self, width: int, *, seconds: float = 0.6, sample_rate: int = SAMPLE_RATE, n_fft: int = 256,
                 hop: int = 128, n_mels: int = 64, detail_channels: int = 0):  # fmt: skip
        super().__init__()
        if n_mels < 0:
            raise ValueError(f"n_mels must be >= 0 (0: linear spectrogram), got {n_mels}")
        if n_mels:
            mel_filterbank(n_fft, n_mels, sample_rate)  # fail here, not at the first item, on too many mels
        self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop, n_mels
        self.num_samples = int(round(seconds * sample_rate))
        self.num_tokens = 2 + self.num_samples // hop  # the class token + torch.stft's frames (center=True)
        self.hidden_size = width
        self.proj = nn.Linear(n_mels or n_fft // 2 + 1, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)
        self.detail = self.detail_out = None
        if detail_channels:
            self.detail = glide_branch(detail_channels)
            self.detail_out = nn.Linear(detail_channels, width)
            nn.init.zeros_(self.detail_out.weight)
            nn.init.zeros_(self.detail_out.bias)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = self.proj(spec)  # (items, frames, width)
        if self.detail is not None:
            x = x + self.detail_out(self.detail(spec.unsqueeze(1)).transpose(1, 2))
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
        synthetic=Synthetic(
            make=synth_tone, save=save_audio, suffix=".wav", questions=TONE_QUESTIONS, caption=tone_caption
        ),
    )
)
