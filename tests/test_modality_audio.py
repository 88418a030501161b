"""The audio modality: files of any rate, depth and channel count load as mono 8 kHz waveforms with their tones
intact; bad inputs are named; the mel filterbank matches a hand computation; the tokenizer reads log-mel frames;
the synthetic tones carry their answers (pitch by FFT peak, beeps by the envelope, sweep by the frequency trend)."""

from __future__ import annotations

import math
import random
import types

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.audio import (
    SAMPLE_RATE,
    TONE_BEEPS,
    TONE_PITCH,
    TONE_SWEEP,
    AudioEncoder,
    SpectrogramTokenizer,
    audio_tokenizer,
    hz_to_mel,
    load_audio,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    preprocess_audio,
    resample,
    spectrogram,
)

AUDIO = get_modality("audio")


def tone(freq: float, rate: int, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def fft_peak(x, rate: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
    return float(np.argmax(spec) * rate / (8 * len(x)))


# --- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate, channels, subtype, suffix",
    [
        (8000, 1, "PCM_16", ".wav"),
        (16000, 1, "PCM_16", ".wav"),
        (44100, 1, "PCM_16", ".wav"),
        (22050, 2, "PCM_16", ".wav"),  # stereo
        (48000, 1, "PCM_24", ".wav"),
        (16000, 1, "FLOAT", ".wav"),
        (11025, 1, "PCM_U8", ".wav"),
        (16000, 2, "PCM_16", ".flac"),
    ],
)
def test_files_of_any_rate_depth_and_channels_load_as_8khz_mono_with_the_tone_kept(
    tmp_path, rate, channels, subtype, suffix
):
    mono = tone(700.0, rate)
    data = np.stack([mono, 0.5 * mono], 1) if channels == 2 else mono
    soundfile.write(tmp_path / f"a{suffix}", data, rate, subtype=subtype)
    wave_ = load_audio(tmp_path / f"a{suffix}")
    assert wave_.dtype == torch.float32 and wave_.shape == (int(0.5 * SAMPLE_RATE),)
    assert abs(fft_peak(wave_, SAMPLE_RATE) - 700.0) < 5.0
    # Away from the clip's edges (where the band-limit rings against the cut) it is the tone sampled at 8 kHz,
    # channels averaged.
    want = tone(700.0, SAMPLE_RATE) * (0.75 if channels == 2 else 1.0)
    tol = 0.02 if subtype == "PCM_U8" else 2e-3
    np.testing.assert_allclose(wave_.numpy()[400:-400], want[400:-400], atol=tol)


def test_ogg_loads_when_soundfile_can_write_it(tmp_path):
    try:
        soundfile.write(tmp_path / "a.ogg", tone(500.0, 16000), 16000, format="OGG", subtype="VORBIS")
    except (RuntimeError, TypeError, ValueError):
        pytest.skip("this libsndfile has no Vorbis")
    assert abs(fft_peak(load_audio(tmp_path / "a.ogg"), SAMPLE_RATE) - 500.0) < 5.0


def test_a_wav_at_the_target_rate_gives_the_values_written_and_bytes_and_arrays_load(tmp_path):
    x = tone(440.0, SAMPLE_RATE)
    soundfile.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="PCM_16")
    torch.testing.assert_close(load_audio(tmp_path / "a.wav"), torch.from_numpy(x), atol=1 / 32768, rtol=0)
    torch.testing.assert_close(load_audio((tmp_path / "a.wav").read_bytes()), load_audio(str(tmp_path / "a.wav")))
    torch.testing.assert_close(load_audio(x), torch.from_numpy(x))
    torch.testing.assert_close(load_audio(np.stack([x, 0 * x], 1)), torch.from_numpy(x / 2))
    pcm = (x * 32768).astype(np.int16)  # integer arrays are PCM: full scale is the dtype's range
    torch.testing.assert_close(load_audio(pcm), torch.from_numpy(pcm / 32768.0).float())
    assert load_audio(x, sample_rate=16000).shape == x.shape  # an array is taken to be at the rate asked for


def test_bad_inputs_raise_media_errors_naming_the_problem(tmp_path):
    soundfile.write(tmp_path / "ok.wav", tone(440.0, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    good = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "header.wav").write_bytes(good[:30])
    (tmp_path / "cut.wav").write_bytes(good[:1000])
    (tmp_path / "junk.wav").write_bytes(b"this is not a sound file at all" * 4)
    (tmp_path / "zero.wav").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    (tmp_path / "image.wav").write_bytes((tmp_path / "image.png").read_bytes())
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    soundfile.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], np.float32), SAMPLE_RATE, subtype="FLOAT")
    cases = [
        (tmp_path / "missing.wav", "not found"),
        (tmp_path / "header.wav", r"unreadable audio .*header\.wav"),
        (tmp_path / "cut.wav", r"cut\.wav: truncated"),
        (tmp_path / "junk.wav", r"unreadable audio .*junk\.wav"),
        (tmp_path / "zero.wav", r"zero\.wav: the file is empty"),
        (tmp_path / "image.png", "PNG image, not audio"),
        (tmp_path / "image.wav", r"image\.wav: it is a PNG image"),
        (tmp_path / "empty.wav", r"empty\.wav: empty audio"),
        (tmp_path / "nan.wav", r"nan\.wav: audio holds NaN"),
        (np.array([0.0, np.nan]), "NaN or infinite"),
        (np.array([0.0, np.inf]), "NaN or infinite"),
        (np.zeros(0, np.float32), "empty audio"),
        (np.zeros((2, 4800), np.float32), r"must be \(samples, channels\)"),  # (channels, samples) by mistake
        (np.zeros((4, 4, 4), np.float32), "got shape"),
        (np.array(["a", "b"]), "numeric"),
    ]
    for source, message in cases:
        with pytest.raises(MediaError, match=message):
            load_audio(source)
    with pytest.raises(MediaError, match="path, bytes or an array"):
        load_audio(3.5)


def test_resampling_is_band_limited():
    x = torch.from_numpy(tone(5000.0, 16000, seconds=0.6))  # above the 4 kHz Nyquist of 8 kHz audio
    assert resample(x, 16000, 8000)[200:-200].abs().max() < 1e-3  # cut, not folded down to 3 kHz
    up = resample(torch.from_numpy(tone(1000.0, 8000)), 8000, 22050)
    np.testing.assert_allclose(up.numpy()[500:-500], tone(1000.0, 22050)[500:-500], atol=2e-3)
    assert resample(x, 16000, 16000) is x
    assert resample(torch.zeros(3, 44101), 44101, 8000).shape == (3, 8000)  # rates with no common factor


# --- mel ----------------------------------------------------------------------------------------------------------


def test_mel_filterbank_matches_a_hand_computation():
    n_fft, n_mels, rate = 16, 3, 16000
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = [hz(mel(8000) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    want = torch.zeros(n_fft // 2 + 1, n_mels)
    for b in range(n_fft // 2 + 1):
        f = b * rate / n_fft
        for m in range(n_mels):
            lo, mid, hi = edges[m : m + 3]
            if lo < f <= mid:
                want[b, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                want[b, m] = (hi - f) / (hi - mid)
    torch.testing.assert_close(mel_filterbank(n_fft, n_mels, rate), want)
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the HTK scale's anchor
    assert mel_to_hz(hz_to_mel(1234.5)) == pytest.approx(1234.5)


def test_mel_filters_peak_at_their_centres_and_tile_the_band():
    n_fft, n_mels, rate = 256, 64, SAMPLE_RATE
    bank = mel_filterbank(n_fft, n_mels, rate)
    assert bank.shape == (129, 64) and bank.min() >= 0 and bank.max() <= 1
    centres = mel_to_hz(np.linspace(0, hz_to_mel(rate / 2), n_mels + 2))[1:-1]
    bin_hz = rate / n_fft
    assert (np.abs(bank.argmax(0).numpy() * bin_hz - centres) <= bin_hz).all()
    # Adjacent triangles meet at each other's centres, so between the first and last centre they sum to 1.
    inside = (np.arange(129) * bin_hz >= centres[0]) & (np.arange(129) * bin_hz <= centres[-1])
    torch.testing.assert_close(bank.sum(1)[inside], torch.ones(int(inside.sum())))
    with pytest.raises(ValueError, match="cover no STFT bin"):
        mel_filterbank(256, 128, SAMPLE_RATE)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(256, 32, SAMPLE_RATE, f_max=5000)


def test_a_tone_lands_in_the_mel_band_holding_its_frequency():
    bank_centres = mel_to_hz(np.linspace(0, hz_to_mel(SAMPLE_RATE / 2), 66))[1:-1]
    for freq in (300.0, 1000.0, 2500.0):
        x = torch.from_numpy(tone(freq, SAMPLE_RATE, seconds=0.6))
        feats = log_mel(x, 256, 128, 64, SAMPLE_RATE)
        assert feats.shape == (1, 1 + 4800 // 128, 64)
        band = int(feats[0, 5:-5].mean(0).argmax())
        assert abs(band - int(np.abs(bank_centres - freq).argmin())) <= 1
    silence = log_mel(torch.zeros(2, 4800))
    assert silence.shape == (2, 38, 64) and torch.allclose(silence, torch.tensor(math.log(1e-6)))


# --- preprocessing and tokenizer ----------------------------------------------------------------------------------


def test_preprocess_is_linear_for_the_encoder_and_log_mel_for_the_tokenizer():
    x = torch.from_numpy(tone(600.0, SAMPLE_RATE, seconds=0.5))
    encoder = AudioEncoder()
    linear = preprocess_audio(x, encoder)
    assert linear.shape == (encoder.num_tokens, 129)
    torch.testing.assert_close(linear, spectrogram(torch.nn.functional.pad(x, (0, 800)))[0])
    tok = SpectrogramTokenizer(32)
    mel = preprocess_audio(x.numpy(), tok)
    assert mel.shape == (tok.num_tokens - 1, 64)
    torch.testing.assert_close(mel, log_mel(torch.nn.functional.pad(x, (0, 800)))[0])
    long = torch.from_numpy(tone(600.0, SAMPLE_RATE, seconds=1.0))
    torch.testing.assert_close(preprocess_audio(long, tok), log_mel(long[:4800])[0])  # cropped to 0.6 s
    assert preprocess_audio(x, SpectrogramTokenizer(32, n_mels=0)).shape == (38, 129)


def test_tokenizer_shapes_gradients_and_settings():
    tok = audio_tokenizer(types.SimpleNamespace(hidden_size=48), {"n_mels": 40})
    assert (tok.hidden_size, tok.num_tokens, tok.n_mels) == (48, 39, 40)
    items = torch.stack([preprocess_audio(torch.from_numpy(tone(f, SAMPLE_RATE)), tok) for f in (300.0, 1200.0)])
    out = tok(items)
    assert out.shape == (2, 39, 48)
    assert (out[0, 1:] - out[1, 1:]).abs().max() > 1e-3  # different sounds, different tokens
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.parameters())
    assert SpectrogramTokenizer(16, seconds=0.256, n_mels=0).num_tokens == 2 + 2048 // 128
    with pytest.raises(TypeError, match="n_bands"):
        audio_tokenizer(types.SimpleNamespace(hidden_size=8), {"n_bands": 3})
    with pytest.raises(ValueError, match="n_mels"):
        SpectrogramTokenizer(8, n_mels=-1)


def glide(start: float, stop: float, seconds: float = 0.6) -> np.ndarray:
    """A tone gliding geometrically from `start` to `stop` Hz; its time reversal glides the other way."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    freq = start * (stop / start) ** (t / seconds)
    return (0.5 * np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)).astype(np.float32)


def test_glide_branch_starts_silent_and_stays_local_in_time():
    torch.manual_seed(0)
    plain, detailed = SpectrogramTokenizer(16), SpectrogramTokenizer(16, detail_channels=4)
    detailed.load_state_dict(plain.state_dict(), strict=False)  # the shared proj, class token and positions
    spec = preprocess_audio(torch.from_numpy(glide(300, 1200)), plain)[None]
    torch.testing.assert_close(detailed(spec), plain(spec))  # its projection starts at zero
    torch.nn.init.normal_(detailed.detail_out.weight)
    changed = spec.clone()
    changed[0, 10] += 1.0  # one frame: two 3x3 layers reach two frames either side, and never the class token
    moved = (detailed(changed) - plain(changed)) - (detailed(spec) - plain(spec))
    reached = moved.abs().amax(-1)[0].nonzero().flatten().tolist()
    assert reached == [1 + f for f in range(8, 13)]
    with pytest.raises(ValueError, match="detail_channels"):
        SpectrogramTokenizer(8, detail_channels=-2)


@pytest.mark.parametrize("channels", [0, 8])
def test_glide_branch_tells_a_rising_tone_from_its_reversal(channels):
    """Mean-pooled frame tokens are blind to time order (each frame is projected alone), so a rising glide and the
    same glide reversed pool to the same vector; the branch sees the slope."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tok = SpectrogramTokenizer(16, detail_channels=channels)
    rising = [glide(f, f * rng.uniform(1.8, 2.2)) for f in rng.uniform(200, 800, 48)]
    waves = rising + [w[::-1].copy() for w in rising]
    x = torch.stack([preprocess_audio(torch.from_numpy(w), tok) for w in waves])
    y = torch.tensor([0] * len(rising) + [1] * len(rising))
    head = torch.nn.Linear(16, 2)
    opt = torch.optim.Adam([*tok.parameters(), *head.parameters()], lr=1e-2)
    train, test = torch.arange(len(y)) % 4 != 0, torch.arange(len(y)) % 4 == 0
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(tok(x[train]).mean(1)), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (head(tok(x[test]).mean(1)).argmax(1) == y[test]).float().mean().item()
    assert accuracy >= 0.9 if channels else accuracy <= 0.6


# --- synthetic tones ----------------------------------------------------------------------------------------------


def envelope_runs(x: np.ndarray, rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(start, stop) of each stretch where the 10 ms RMS is above half its maximum."""
    win = rate // 100
    env = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(win) / win, mode="same"))
    on = np.concatenate([[0], (env > 0.5 * env.max()).astype(int), [0]])
    return list(zip(np.flatnonzero(np.diff(on) == 1), np.flatnonzero(np.diff(on) == -1), strict=True))


def instantaneous_frequency(x: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """From the analytic signal's phase (the FFT Hilbert transform)."""
    n = len(x)
    h = np.zeros(n)
    h[0], h[1 : (n + 1) // 2] = 1, 2
    if n % 2 == 0:
        h[n // 2] = 1
    analytic = np.fft.ifft(np.fft.fft(x) * h)
    return np.diff(np.unwrap(np.angle(analytic))) * rate / (2 * np.pi)


def hand_answers(x: np.ndarray) -> dict[str, str]:
    runs = envelope_runs(x)
    start, stop = runs[0]
    centre = (start + stop) // 2
    peak = fft_peak(x[centre - 80 : centre + 80], SAMPLE_RATE)  # 20 ms around the beep's middle: its centre pitch
    pitch = min(TONE_PITCH, key=lambda p: abs(math.log2(peak / TONE_PITCH[p])))
    core = instantaneous_frequency(x[start:stop])[10:-10]
    half = len(core) // 2
    trend = math.log2(np.median(core[half:]) / np.median(core[:half]))  # octaves from first to second half
    sweep = "rising" if trend > 0.2 else "falling" if trend < -0.2 else "steady"
    return {"pitch": pitch, "beeps": {1: "one", 2: "two", 3: "three"}.get(len(runs), "many"), "sweep": sweep}


def test_synthetic_tones_round_trip_and_carry_their_answers(tmp_path):
    synth = AUDIO.synthetic
    rng = random.Random(0)
    agree = {q: 0 for q in synth.questions}
    for i in range(60):
        raw, answers = synth.make(rng)
        path = tmp_path / f"t{i}{synth.suffix}"
        synth.save(raw, path)
        wave_ = AUDIO.load(path)
        torch.testing.assert_close(wave_, torch.from_numpy(raw), atol=1 / 32768, rtol=0)
        hand = hand_answers(wave_.numpy())
        for q in agree:
            agree[q] += hand[q] == answers[q]
    assert synth.suffix == ".wav" and all(n >= 0.9 * 60 for n in agree.values()), agree
    tok = SpectrogramTokenizer(32)
    assert AUDIO.preprocess(wave_, tok).shape == (tok.num_tokens - 1, tok.n_mels)


def test_synthetic_tones_are_deterministic_balanced_and_described():
    synth = AUDIO.synthetic
    a, b = synth.make(random.Random(5)), synth.make(random.Random(5))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[0].shape == (4800,) and a[0].dtype == np.float32
    draws = [synth.make(random.Random(s))[1] for s in range(100)]
    for q, classes in (("pitch", TONE_PITCH), ("beeps", TONE_BEEPS), ("sweep", TONE_SWEEP)):
        assert {d[q] for d in draws} == set(classes)
    assert set(synth.questions) == {"pitch", "beeps", "sweep"}
    for phrasings in synth.questions.values():
        assert len(phrasings) == 3 and all(p == p.lower() and p.endswith(" ?") for p in phrasings)
    caption = synth.caption(a[1], random.Random(0))
    assert caption == caption.lower() and all(word in caption.split() for word in a[1].values())
