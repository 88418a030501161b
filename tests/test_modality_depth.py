"""The depth modality: .npy metres and 16-bit PNG millimetres load to the same map, bad inputs name their problem,
preprocessing scales by the maximum depth, and the two-object scenes carry their answers."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.depth import (
    DepthTokenizer,
    depth_tokenizer,
    load_depth,
    preprocess_depth,
    save_depth_png,
    synth_depth,
)

DEPTH = get_modality("depth")


def recover_answers(depth: np.ndarray) -> dict[str, str]:
    """Objects are whatever stands well in front of the ~8 m wall; the nearer half has the smaller mean depth."""
    objects = depth < 7.25
    half = depth.shape[1] // 2
    halves = {"left": slice(0, half), "right": slice(half, None)}
    means = {side: depth[:, cols][objects[:, cols]].mean() for side, cols in halves.items()}
    nearer = min(means, key=means.get)
    mask = objects[:, :half] if nearer == "left" else objects[:, half:]
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))  # a square fills its bounding box, a disc ~pi/4
    return {"nearer": nearer, "near_shape": "square" if fill > 0.9 else "circle"}


def test_registered():
    assert DEPTH.placeholder == "<depth>" and DEPTH.record_key == "depth"
    assert DEPTH.default_encoder == "modality-transformer"
    assert DEPTH.synthetic.suffix == ".png"


def test_round_trip_carries_the_answers(tmp_path):
    rng = random.Random(0)
    tok = DepthTokenizer(16)
    agree = {q: 0 for q in DEPTH.synthetic.questions}
    for i in range(50):
        raw, answers = DEPTH.synthetic.make(rng)
        assert raw.shape == (32, 32) and raw.dtype == np.float32
        path = tmp_path / f"d{i}{DEPTH.synthetic.suffix}"
        DEPTH.synthetic.save(raw, path)
        assert Image.open(path).mode in {"I;16", "I"}
        back = DEPTH.load(path)
        np.testing.assert_array_equal(back, raw)  # the map is made in whole millimetres: the PNG is exact
        x = DEPTH.preprocess(back, tok)
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        for q, a in recover_answers(back).items():
            agree[q] += a == answers[q]
    assert all(n >= 45 for n in agree.values()), agree


def test_depth_ranges():
    rng = random.Random(1)
    for _ in range(30):
        raw, answers = synth_depth(rng)
        near = raw[:, :16] if answers["nearer"] == "left" else raw[:, 16:]
        far = raw[:, 16:] if answers["nearer"] == "left" else raw[:, :16]
        assert 1.4 < near.min() < 3.6 and 4.4 < far.min() < 7.1
        assert 7.4 < np.median(raw) < 8.6  # most of the view is the back wall


def test_npy_png_array_and_bytes_agree(tmp_path):
    metres = np.random.default_rng(0).uniform(0.5, 9.0, (12, 20)).astype(np.float32)
    np.save(tmp_path / "d.npy", metres)
    np.testing.assert_array_equal(load_depth(tmp_path / "d.npy"), metres)
    np.testing.assert_array_equal(load_depth(str(tmp_path / "d.npy")), metres)
    np.testing.assert_array_equal(load_depth(metres), metres)
    np.testing.assert_array_equal(load_depth((tmp_path / "d.npy").read_bytes()), metres)
    millimetres = np.rint(metres * 1000).astype(np.uint16)
    Image.fromarray(millimetres).save(tmp_path / "d.png")
    np.testing.assert_allclose(load_depth(tmp_path / "d.png"), metres, atol=5e-4, rtol=0)
    np.testing.assert_allclose(load_depth((tmp_path / "d.png").read_bytes()), metres, atol=5e-4, rtol=0)
    assert load_depth(metres.astype(np.float64)).dtype == np.float32


def test_zeros_allowed_but_not_all_zero():
    depth = np.full((4, 4), 3.0, np.float32)
    depth[0, 0] = 0.0  # a missing reading
    assert load_depth(depth)[0, 0] == 0.0
    with pytest.raises(MediaError, match="all zeros"):
        load_depth(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((8, 8, 3), np.float32), "looks like a colour image, not a depth map"),
        (np.ones(8, np.float32), "must be 2-D"),
        (np.ones((2, 8, 8), np.float32), "must be 2-D"),
        (np.zeros((0, 8), np.float32), "empty"),
        (np.array([[1.0, np.nan]], np.float32), "NaN or infinite"),
        (np.array([[1.0, np.inf]], np.float32), "NaN or infinite"),
        (np.array([[1.0, -0.5]], np.float32), "negative depths"),
        (np.full((4, 4), 1500, np.uint16), "float metres"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(MediaError, match=match):
        load_depth(array)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.png", "not found"),
        (lambda p: (p / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken") and p / "x.png", "unreadable depth map"),
        (lambda p: (p / "x.npy").write_bytes(b"junk") and p / "x.npy", "unreadable .npy"),
        (lambda p: Image.new("RGB", (8, 8), (9, 9, 9)).save(p / "x.png") or p / "x.png", "looks like a colour image"),
        (lambda p: Image.new("L", (8, 8), 9).save(p / "x.png") or p / "x.png", "16-bit"),
        (lambda p: np.save(p / "x.npy", np.ones((8, 8, 3), np.float32)) or p / "x.npy", "colour image"),
        (lambda p: np.save(p / "x.npy", np.full((4, 4), np.nan, np.float32)) or p / "x.npy", "x.npy.*NaN"),
        (lambda p: (p / "x.wav").write_bytes(b"RIFF....WAVEfmt ") and p / "x.wav", "not a depth map file"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", r"not a depth map file \(suffix '.txt'\)"),
    ],
)
def test_bad_files(tmp_path, make, match):
    with pytest.raises(MediaError, match=match):
        load_depth(make(tmp_path))


def test_preprocess_resizes_and_scales():
    depth = np.full((64, 48), 5.0, np.float32)
    depth[:, :24] = 20.0  # beyond max_depth: clamps to 1
    x = preprocess_depth(depth, SimpleNamespace(size=16, max_depth=10.0))
    assert x.shape == (1, 16, 16)
    torch.testing.assert_close(x[0, :, :4], torch.ones(16, 4))
    torch.testing.assert_close(x[0, :, -4:], torch.full((16, 4), 0.5))
    same = preprocess_depth(np.full((16, 16), 2.0, np.float32), SimpleNamespace(size=16, max_depth=4.0))
    torch.testing.assert_close(same, torch.full((1, 16, 16), 0.5))


def test_tokenizer_shapes_and_gradients():
    tok = depth_tokenizer(SimpleNamespace(hidden_size=24), {})
    assert tok.num_tokens == 17 and tok.hidden_size == 24 and (tok.size, tok.max_depth) == (32, 10.0)
    x = torch.stack([preprocess_depth(synth_depth(random.Random(s))[0], tok) for s in range(3)])  # (3, 1, 32, 32)
    out = tok(x)
    assert out.shape == (3, 17, 24)
    assert not torch.allclose(out[0, 1:], out[1, 1:])
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.parameters())
    assert DepthTokenizer(8, size=64, patch=16, max_depth=5.0).num_tokens == 17


def test_tokenizer_settings_are_checked():
    with pytest.raises(TypeError, match="depth_max"):
        depth_tokenizer(SimpleNamespace(hidden_size=8), {"depth_max": 5.0})
    with pytest.raises(ValueError, match="patch"):
        DepthTokenizer(8, size=30)
    with pytest.raises(ValueError, match="max_depth"):
        DepthTokenizer(8, max_depth=0)
    with pytest.raises(ValueError, match=r"expects \(items, 1, 32, 32\)"):
        DepthTokenizer(8)(torch.zeros(2, 32, 32))


def test_generator_deterministic_and_balanced():
    a, b = synth_depth(random.Random(7)), synth_depth(random.Random(7))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    rng = random.Random(8)
    seen = {q: set() for q in DEPTH.synthetic.questions}
    for _ in range(100):
        for q, answer in synth_depth(rng)[1].items():
            seen[q].add(answer)
    assert seen == {"nearer": {"left", "right"}, "near_shape": {"circle", "square"}}


def test_save_rejects_what_a_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="65.535"):
        save_depth_png(np.full((4, 4), 70.0, np.float32), tmp_path / "far.png")


def test_questions_and_caption():
    for phrasings in DEPTH.synthetic.questions.values():
        assert len(phrasings) == 3 and all(p.endswith(" ?") and p == p.lower() for p in phrasings)
    rng = random.Random(0)
    for _ in range(10):
        caption = DEPTH.synthetic.caption({"nearer": "left", "near_shape": "square"}, rng)
        assert {"left", "square"} <= set(caption.split()) and caption == caption.lower()
