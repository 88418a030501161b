"""The IMU modality: CSV (with or without a header, with or without a time column) and NPY files load to the
values they were written from, bad inputs are refused by name, preprocessing crops or pads to a fixed length in
fixed units, the patch tokenizer trains, and the embedded recordings carry their answers (dominant frequency,
spread and mean yaw rate give the activity; the mean acceleration gives the orientation)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.imu import (
    ACTIVITIES,
    COLUMNS,
    ORIENTATIONS,
    IMUTokenizer,
    imu_tokenizer,
    load_imu,
    preprocess_imu,
)

IMU = get_modality("imu")


def signal(n: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).round(4).astype(np.float32)


def write_csv(path, rows, header=None) -> None:
    lines = ([",".join(header)] if header else []) + [",".join(str(c) for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def guess(values: np.ndarray) -> tuple[str, str]:
    """Activity and orientation from the signal alone. Gravity is the mean acceleration: its device axis is the
    orientation, and projecting on it gives the vertical motion and the yaw rate. A sustained yaw rate is
    turning; no vertical motion is still; otherwise the motion's dominant frequency (jumps ~1 Hz, steps ~2 Hz,
    running strides ~3 Hz) tells the rest."""
    acc, gyro = values[:, :3].astype(np.float64), values[:, 3:].astype(np.float64)
    gravity = acc.mean(0)
    orientation = "flat" if abs(gravity[2]) > abs(gravity[1]) else "upright"
    up = gravity / np.linalg.norm(gravity)
    vertical = acc @ up - (acc @ up).mean()
    if abs((gyro @ up).mean()) > 0.4:
        return "turning", orientation
    if vertical.std() < 0.4:
        return "still", orientation
    peak = np.fft.rfftfreq(len(vertical), 1 / 50)[np.abs(np.fft.rfft(vertical)).argmax()]
    return ("jumping" if peak < 1.5 else "walking" if peak < 2.4 else "running"), orientation


def test_synthetic_round_trip_carries_its_answers(tmp_path):
    rng = random.Random(0)
    tokenizer = IMUTokenizer(16)
    hits = 0
    for i in range(50):
        raw, answers = IMU.synthetic.make(rng)
        path = tmp_path / f"m{i}{IMU.synthetic.suffix}"
        IMU.synthetic.save(raw, path)
        loaded = IMU.load(str(path))
        np.testing.assert_array_equal(loaded, raw)
        x = IMU.preprocess(loaded, tokenizer)
        assert x.shape == (200, 6) and x.abs().max() < 5  # O(1) in g and turns per second
        hits += guess(loaded) == (answers["activity"], answers["orientation"])
    assert hits >= 45
    assert path.read_text().startswith("time," + ",".join(COLUMNS) + "\n")


def test_csv_and_npy_forms_load_the_written_values(tmp_path):
    values = signal()
    write_csv(tmp_path / "plain.csv", values.tolist(), header=COLUMNS)
    write_csv(tmp_path / "bare.csv", values.tolist())
    time = np.arange(len(values))[:, None] * 0.02
    write_csv(tmp_path / "timed.csv", np.hstack([time, values]).tolist(), header=("timestamp",) + COLUMNS)
    shuffled = [5, 0, 3, 1, 4, 2]  # columns are found by name
    write_csv(tmp_path / "shuffled.csv", values[:, shuffled].tolist(), header=[COLUMNS[i].upper() for i in shuffled])
    np.save(tmp_path / "a.npy", values)
    for name in ("plain.csv", "bare.csv", "timed.csv", "shuffled.csv", "a.npy"):
        np.testing.assert_array_equal(load_imu(tmp_path / name), values, err_msg=name)
    np.testing.assert_array_equal(load_imu((tmp_path / "timed.csv").read_bytes()), values)
    np.testing.assert_array_equal(load_imu(values.astype(np.float64)), values)
    assert load_imu(values).dtype == np.float32


def test_bad_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(MediaError, match="IMU file not found"):
        load_imu(tmp_path / "missing.csv")
    write_csv(tmp_path / "four.csv", signal()[:, :4].tolist())
    with pytest.raises(MediaError, match=r"four\.csv: row 1: expected 6 columns \(acc xyz, gyro xyz\), got 4"):
        load_imu(tmp_path / "four.csv")
    write_csv(tmp_path / "four_named.csv", signal()[:, :4].tolist(), header=COLUMNS[:4])
    with pytest.raises(MediaError, match=r"expected 6 columns \(acc xyz, gyro xyz\), got 4"):
        load_imu(tmp_path / "four_named.csv")
    np.save(tmp_path / "four.npy", signal()[:, :4])
    with pytest.raises(MediaError, match=r"expected 6 columns \(acc xyz, gyro xyz\), got 4"):
        load_imu(tmp_path / "four.npy")
    rows = signal(5).tolist()
    rows[2][3] = "fast"
    write_csv(tmp_path / "word.csv", rows, header=COLUMNS)
    with pytest.raises(MediaError, match=r"word\.csv: row 4: non-numeric cell 'fast'"):
        load_imu(tmp_path / "word.csv")
    rows[2][3] = "nan"
    write_csv(tmp_path / "nan.csv", rows, header=COLUMNS)
    with pytest.raises(MediaError, match=r"nan\.csv: row 4: NaN or infinite"):
        load_imu(tmp_path / "nan.csv")
    bad = signal()
    bad[7, 0] = np.inf
    with pytest.raises(MediaError, match="NaN or infinite values"):
        load_imu(bad)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MediaError, match="empty IMU file"):
        load_imu(tmp_path / "empty.csv")
    write_csv(tmp_path / "header_only.csv", [], header=COLUMNS)
    with pytest.raises(MediaError, match="empty IMU file"):
        load_imu(tmp_path / "header_only.csv")
    with pytest.raises(MediaError, match="empty IMU recording"):
        load_imu(np.zeros((0, 6), dtype=np.float32))
    write_csv(tmp_path / "renamed.csv", signal().tolist(), header=("ax", "ay", "az", "gx", "gy", "gz"))
    with pytest.raises(MediaError, match="lacks"):
        load_imu(tmp_path / "renamed.csv")
    (tmp_path / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(MediaError, match=r"image\.csv: not an IMU CSV/NPY file"):
        load_imu(tmp_path / "image.csv")
    with pytest.raises(MediaError, match=r"\(T, 6\)"):
        load_imu(np.zeros(6, dtype=np.float32))


def test_preprocess_crops_the_centre_pads_the_end_and_rescales():
    tokenizer = IMUTokenizer(8, num_samples=20, patch=5)
    values = np.arange(30 * 6, dtype=np.float32).reshape(30, 6)
    out = preprocess_imu(values, tokenizer)
    assert out.shape == (20, 6)
    torch.testing.assert_close(out[0, 0] * 9.81, torch.tensor(values[5, 0]))  # the centre 20 of 30 start at 5
    torch.testing.assert_close(out[0, 3] * 2 * np.pi, torch.tensor(values[5, 3]))
    short = preprocess_imu(values[:12], tokenizer)
    assert short.shape == (20, 6) and (short[12:] == 0).all() and (short[:12] != 0).sum() > 60


def test_tokenizer_shapes_gradients_and_settings():
    tokenizer = imu_tokenizer(SimpleNamespace(hidden_size=24), {})
    assert tokenizer.num_tokens == 21 and tokenizer.hidden_size == 24 and tokenizer.num_samples == 200
    rng = random.Random(1)
    items = torch.stack([preprocess_imu(IMU.synthetic.make(rng)[0], tokenizer) for _ in range(3)])
    out = tokenizer(items)
    assert out.shape == (3, 21, 24)
    assert not torch.allclose(out[0, 1:], out[1, 1:])
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokenizer.parameters())
    assert IMUTokenizer(8, num_samples=400, patch=20)(torch.randn(2, 400, 6)).shape == (2, 21, 8)
    with pytest.raises(TypeError, match="rate"):
        imu_tokenizer(SimpleNamespace(hidden_size=8), {"rate": 100})
    with pytest.raises(ValueError, match="multiple of patch"):
        IMUTokenizer(8, num_samples=205, patch=10)


def test_generator_is_deterministic_balanced_and_described():
    first, again = IMU.synthetic.make(random.Random(7)), IMU.synthetic.make(random.Random(7))
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1] and first[0].shape == (200, 6) and first[0].dtype == np.float32
    rng = random.Random(3)
    draws = [IMU.synthetic.make(rng)[1] for _ in range(100)]
    assert {d["activity"] for d in draws} == set(ACTIVITIES)
    assert {d["orientation"] for d in draws} == set(ORIENTATIONS)
    assert set(IMU.synthetic.questions) == {"activity", "orientation"}
    assert all(len(q) == 3 and all(s.endswith(" ?") for s in q) for q in IMU.synthetic.questions.values())
    caption = IMU.synthetic.caption({"activity": "jumping", "orientation": "upright"}, random.Random(0))
    assert "jumping" in caption and "upright" in caption and caption == caption.lower()
