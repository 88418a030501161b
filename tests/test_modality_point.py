"""The point-cloud modality: PLY (ascii, binary) and NPY files load to the values they were written from, bad
inputs are refused by name, preprocessing keeps size and gives a fixed shape, the Point-BERT-style tokenizer
trains, and the embedded shapes carry their answers (a hand statistic recovers shape and size)."""

from __future__ import annotations

import random
import struct
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.point import (
    SHAPES,
    SIZES,
    PointTokenizer,
    farthest_point_sample,
    load_point,
    point_tokenizer,
    preprocess_point,
    save_ply,
)

POINT = get_modality("point")


def cloud(n: int = 40, columns: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, columns)).astype(np.float32)


def guess(points: np.ndarray) -> tuple[str, str]:
    """Shape and size from geometry alone: the spread of distances to the centroid (0 on a sphere, larger on a
    cube, larger still on a cone, whose centroid sits off its apex), the covariance's elongation (a cylinder's
    axis) and the farthest point from the centroid (the size)."""
    p = points[:, :3] - points[:, :3].mean(0)
    d = np.linalg.norm(p, axis=1)
    spread = d.std() / d.mean()
    eig = np.sort(np.linalg.eigvalsh(np.cov(p.T)))
    if spread < 0.1:
        shape = "sphere"
    elif eig[2] / eig[1] > 1.55:
        shape = "cylinder"
    else:
        shape = "cone" if spread > 0.16 else "cube"
    return shape, "large" if d.max() > 0.62 else "small"


def test_synthetic_round_trip_carries_its_answers(tmp_path):
    rng = random.Random(0)
    tokenizer = PointTokenizer(16)
    hits = 0
    for i in range(50):
        raw, answers = POINT.synthetic.make(rng)
        path = tmp_path / f"p{i}{POINT.synthetic.suffix}"
        POINT.synthetic.save(raw, path)
        loaded = POINT.load(str(path))
        np.testing.assert_array_equal(loaded, raw)
        assert POINT.preprocess(loaded, tokenizer).shape == (256, 3)
        hits += guess(loaded) == (answers["shape"], answers["size"])
    assert hits >= 45
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")


def test_binary_and_ascii_ply_and_npy_load_the_written_values(tmp_path):
    points = cloud()
    save_ply(points, tmp_path / "b.ply")
    save_ply(points, tmp_path / "a.ply", binary=False)
    np.save(tmp_path / "c.npy", points[:, :3])
    np.testing.assert_array_equal(load_point(tmp_path / "b.ply"), points)
    np.testing.assert_array_equal(load_point(str(tmp_path / "a.ply")), points)
    np.testing.assert_array_equal(load_point(tmp_path / "c.npy"), points[:, :3])
    np.testing.assert_array_equal(load_point((tmp_path / "b.ply").read_bytes()), points)
    np.testing.assert_array_equal(load_point(points.astype(np.float64)), points)


def test_ply_extra_properties_faces_and_doubles_are_handled(tmp_path):
    """Colours are skipped, faces after the vertices ignored, doubles read, normals taken only when all three
    are there; a comment and CRLF line ends are fine."""
    ascii_ply = (
        "ply\r\nformat ascii 1.0\r\ncomment made by hand\r\nelement vertex 3\r\nproperty double x\r\n"
        "property double y\r\nproperty double z\r\nproperty uchar red\r\nproperty float nx\r\nelement face 1\r\n"
        "property list uchar int vertex_indices\r\nend_header\r\n"
        "0.5 1 2 255 0.1\r\n3 4 5 0 0.2\r\n6 7 8.25 9 0.3\r\n3 0 1 2\r\n"
    )
    (tmp_path / "a.ply").write_text(ascii_ply, newline="")
    np.testing.assert_array_equal(load_point(tmp_path / "a.ply"), [[0.5, 1, 2], [3, 4, 5], [6, 7, 8.25]])
    vertices = [(1.0, 2.0, 3.0, 7, 0.0, 0.0, 1.0), (4.0, 5.0, 6.0, 9, 1.0, 0.0, 0.0)]
    body = b"".join(struct.pack("<dddBfff", *v) for v in vertices)
    body += struct.pack("<Biii", 3, 0, 1, 0)
    header = (
        b"ply\nformat binary_little_endian 1.0\nelement vertex 2\nproperty double x\nproperty double y\n"
        b"property double z\nproperty uchar flag\nproperty float nx\nproperty float ny\nproperty float nz\n"
        b"element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    )
    (tmp_path / "b.ply").write_bytes(header + body)
    np.testing.assert_array_equal(load_point(tmp_path / "b.ply"), [[1, 2, 3, 0, 0, 1], [4, 5, 6, 1, 0, 0]])


def test_bad_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(MediaError, match="point cloud file not found"):
        load_point(tmp_path / "missing.ply")
    save_ply(cloud(10), tmp_path / "ok.ply")
    data = (tmp_path / "ok.ply").read_bytes()
    (tmp_path / "short.ply").write_bytes(data[:-20])
    with pytest.raises(MediaError, match=r"short\.ply: truncated PLY"):
        load_point(tmp_path / "short.ply")
    (tmp_path / "noend.ply").write_bytes(data[:30])
    with pytest.raises(MediaError, match="no end_header"):
        load_point(tmp_path / "noend.ply")
    save_ply(cloud(10), tmp_path / "ok_ascii.ply", binary=False)
    text = (tmp_path / "ok_ascii.ply").read_text()
    (tmp_path / "cut.ply").write_text(text[: text.rindex("\n", 0, -1)])
    with pytest.raises(MediaError, match="truncated PLY: 9 of 10 vertices"):
        load_point(tmp_path / "cut.ply")
    lines = text.splitlines()
    lines[-1] = "abc " + lines[-1].split(" ", 1)[1]
    (tmp_path / "word.ply").write_text("\n".join(lines) + "\n")
    with pytest.raises(MediaError, match=r"word\.ply: corrupt PLY: a vertex value is not a number"):
        load_point(tmp_path / "word.ply")
    (tmp_path / "noxyz.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
    with pytest.raises(MediaError, match="no x y z"):
        load_point(tmp_path / "noxyz.ply")
    png = tmp_path / "image.ply"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(MediaError, match=r"image\.ply: not a PLY/NPY point cloud \(it looks like a PNG image\)"):
        load_point(png)
    with wave.open(str(tmp_path / "s.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000), f.writeframes(bytes(100))
    with pytest.raises(MediaError, match="not a PLY/NPY point cloud"):
        load_point(tmp_path / "s.wav")
    (tmp_path / "empty.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\n"
                                        "property float y\nproperty float z\nend_header\n")  # fmt: skip
    with pytest.raises(MediaError, match="empty point cloud"):
        load_point(tmp_path / "empty.ply")
    np.save(tmp_path / "four.npy", cloud(5, 4))
    with pytest.raises(MediaError, match=r"must be \(N, 3\) or \(N, 6\).*\(5, 4\)"):
        load_point(tmp_path / "four.npy")
    bad = cloud(5, 3)
    bad[2, 1] = np.nan
    with pytest.raises(MediaError, match="NaN or infinite"):
        load_point(bad)
    bad[2, 1] = np.inf
    save_ply(bad, tmp_path / "inf.ply")
    with pytest.raises(MediaError, match=r"inf\.ply: point cloud holds NaN or infinite"):
        load_point(tmp_path / "inf.ply")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(MediaError, match="unreadable NPY"):
        load_point(tmp_path / "broken.npy")


def test_preprocess_keeps_size_and_gives_a_fixed_shape():
    tokenizer = PointTokenizer(16, num_points=64)
    big = cloud(500, 6, seed=1) + np.array([5, -3, 2, 0, 0, 0], dtype=np.float32)
    out = preprocess_point(big, tokenizer)
    assert out.shape == (64, 3)
    assert out.abs().max() > 1.5  # centred only: a unit normal cloud stays wider than the unit sphere
    assert torch.equal(out, preprocess_point(big, tokenizer))  # deterministic
    small = preprocess_point(cloud(10, 6), tokenizer)
    assert small.shape == (64, 3) and len(torch.unique(small, dim=0)) == 10  # repeated, not invented
    with_normals = PointTokenizer(16, num_points=64, use_normals=True)
    out = preprocess_point(big, with_normals)
    assert out.shape == (64, 6) and out[:, 3:].abs().max() > 1  # normals are not rescaled
    unit = preprocess_point(big, PointTokenizer(16, num_points=64, unit_sphere=True))
    assert unit.norm(dim=1).max() <= 1 + 1e-5 and abs(unit.mean(0)).max() < 0.3
    halved = preprocess_point(big, PointTokenizer(16, num_points=64, scale=2.0))
    torch.testing.assert_close(halved * 2, preprocess_point(big, tokenizer))
    with pytest.raises(MediaError, match="use_normals"):
        preprocess_point(cloud(100, 3), with_normals)


def test_farthest_point_sampling_spreads_the_picks():
    xyz = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [5, 0, 0], [0, 3, 0], [0.05, 0.05, 0]]])
    assert farthest_point_sample(xyz, 3).tolist() == [[0, 2, 3]]


def test_tokenizer_shapes_gradients_and_settings():
    tokenizer = point_tokenizer(SimpleNamespace(hidden_size=24), {})
    assert tokenizer.num_tokens == 33 and tokenizer.hidden_size == 24
    rng = random.Random(1)
    items = torch.stack([preprocess_point(POINT.synthetic.make(rng)[0], tokenizer) for _ in range(3)])
    out = tokenizer(items)
    assert out.shape == (3, 33, 24)
    assert not torch.allclose(out[0, 1:], out[1, 1:])
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokenizer.parameters())
    normals = PointTokenizer(8, num_points=64, groups=8, neighbours=4, use_normals=True)
    assert normals(torch.randn(2, 64, 6)).shape == (2, 9, 8)
    with pytest.raises(ValueError, match=r"expected \(items, points, 6\)"):
        normals(torch.randn(2, 64, 3))
    with pytest.raises(TypeError, match="colour"):
        point_tokenizer(SimpleNamespace(hidden_size=8), {"colour": True})
    with pytest.raises(ValueError, match="neighbours"):
        PointTokenizer(8, num_points=16, neighbours=32)


def test_generator_is_deterministic_balanced_and_described():
    first, again = POINT.synthetic.make(random.Random(7)), POINT.synthetic.make(random.Random(7))
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1] and first[0].shape == (256, 6) and first[0].dtype == np.float32
    rng = random.Random(3)
    draws = [POINT.synthetic.make(rng)[1] for _ in range(100)]
    assert {d["shape"] for d in draws} == set(SHAPES) and {d["size"] for d in draws} == set(SIZES)
    assert set(POINT.synthetic.questions) == {"shape", "size"}
    assert all(len(q) == 3 and all(s.endswith(" ?") for s in q) for q in POINT.synthetic.questions.values())
    caption = POINT.synthetic.caption({"shape": "cone", "size": "small"}, random.Random(0))
    assert "cone" in caption and "small" in caption and caption == caption.lower()
    normals = first[0][:, 3:]
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-5)
