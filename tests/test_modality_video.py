"""The video modality: every format loads to the same frames, bad inputs name their problem, frames are sampled
uniformly, the tubelet tokenizer sees the order of frames, and the moving-shapes clips carry their answers."""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoTokenizer,
    frame_indices,
    load_video,
    preprocess_video,
    save_gif,
    synth_video,
    video_tokenizer,
)

VIDEO = get_modality("video")
REFERENCE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def settings(**kw):
    return SimpleNamespace(**{"num_frames": 8, "size": 32, "mean": CLIP_MEAN, "std": CLIP_STD, **kw})


def random_clip(frames=5, h=12, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def recover_answers(clip: np.ndarray) -> dict[str, str]:
    """Read the answers off the pixels: the shape is the saturated part of each frame (the background is grey)."""
    mask = (clip.max(-1).astype(int) - clip.min(-1)) > 60  # (T, H, W)
    centroids, fills, tops = [], [], []
    for m in mask:
        ys, xs = np.nonzero(m)
        centroids.append((xs.mean(), ys.mean()))
        fills.append(m.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))
        tops.append(np.mean(ys < (ys.min() + ys.max()) / 2))  # share of the pixels in the upper half
    centroids = np.array(centroids)
    step = (centroids[-1] - centroids[0]) / (len(clip) - 1)  # pixels per frame, (x, y) with y pointing down
    axis = int(np.argmax(np.abs(step)))
    direction = [["left", "right"], ["up", "down"]][axis][int(step[axis] > 0)]
    # An upright triangle keeps most of its pixels low; a square fills its bounding box, a disc ~pi/4 of it.
    shape = "triangle" if np.mean(tops) < 0.35 else "square" if np.mean(fills) > 0.9 else "circle"
    mean_rgb = clip[mask].mean(0)
    color = min(REFERENCE_COLORS, key=lambda c: np.linalg.norm(mean_rgb - np.array(REFERENCE_COLORS[c])))
    return {"direction": direction, "speed": "fast" if abs(step[axis]) > 2 else "slow", "shape": shape, "color": color}


def test_registered():
    assert VIDEO.placeholder == "<video>" and VIDEO.record_key == "video"
    assert VIDEO.default_encoder == "modality-transformer"
    assert VIDEO.synthetic.suffix == ".gif"


def test_round_trip_carries_the_answers(tmp_path):
    rng = random.Random(0)
    tok = VideoTokenizer(16)
    agree = {q: 0 for q in VIDEO.synthetic.questions}
    for i in range(50):
        raw, answers = VIDEO.synthetic.make(rng)
        assert raw.shape == (8, 32, 32, 3) and raw.dtype == np.uint8
        path = tmp_path / f"clip{i}{VIDEO.synthetic.suffix}"
        VIDEO.synthetic.save(raw, path)
        back = VIDEO.load(path)
        np.testing.assert_array_equal(back, raw)  # the fixed palette makes the GIF lossless, every frame kept
        x = VIDEO.preprocess(back, tok)
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        for q, a in recover_answers(back).items():
            agree[q] += a == answers[q]
    assert all(n >= 45 for n in agree.values()), agree


def test_fast_shape_stays_inside_the_frame():
    rng = random.Random(1)
    for _ in range(100):
        raw, answers = synth_video(rng)
        if answers["speed"] == "fast":
            mask = (raw.max(-1).astype(int) - raw.min(-1)) > 60
            counts = mask.sum((1, 2))
            assert counts.min() > 0.8 * counts.max(), "the shape was cut by the border"


def test_gif_from_any_clip_keeps_every_frame(tmp_path):
    clip = random_clip(frames=6)  # thousands of colours: one shared quantised palette
    save_gif(clip, tmp_path / "a.gif")
    back = load_video(tmp_path / "a.gif")
    assert back.shape == clip.shape
    assert np.abs(back.astype(int) - clip).mean() < 40  # lossy but recognisable
    with pytest.raises(ValueError, match="identical consecutive frames"):
        save_gif(np.stack([clip[0], clip[0]]), tmp_path / "b.gif")


def test_frame_folder_sorted_by_number(tmp_path):
    clip = random_clip(frames=12)
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"frame{i}.png")  # frame10 must come after frame9, not frame1
    (tmp_path / "notes.txt").write_text("ignored")
    np.testing.assert_array_equal(load_video(tmp_path), clip)


def test_jpeg_folder_loads(tmp_path):
    clip = np.full((3, 16, 16, 3), 120, np.uint8)
    clip[1] = 200
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"{i:03d}.jpg", quality=95)
    back = load_video(tmp_path)
    assert back.shape == clip.shape and np.abs(back.astype(int) - clip).max() <= 3


def test_npy_array_and_bytes(tmp_path):
    clip = random_clip()
    np.save(tmp_path / "c.npy", clip)
    np.testing.assert_array_equal(load_video(tmp_path / "c.npy"), clip)
    np.testing.assert_array_equal(load_video(str(tmp_path / "c.npy")), clip)
    np.testing.assert_array_equal(load_video(clip), clip)
    np.testing.assert_array_equal(load_video((tmp_path / "c.npy").read_bytes()), clip)
    raw, _ = synth_video(random.Random(3))
    save_gif(raw, tmp_path / "s.gif")
    np.testing.assert_array_equal(load_video((tmp_path / "s.gif").read_bytes()), raw)


def write_mp4(path, clip: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=10)  # lossless RGB H.264, so frames compare exactly
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "rgb24"
        stream.options = {"crf": "0"}
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_mp4_loads(tmp_path):
    pytest.importorskip("av")
    raw, _ = synth_video(random.Random(4))
    write_mp4(tmp_path / "c.mp4", raw)
    np.testing.assert_array_equal(load_video(tmp_path / "c.mp4"), raw)
    np.testing.assert_array_equal(load_video((tmp_path / "c.mp4").read_bytes()), raw)


def test_mp4_errors(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(MediaError, match="unreadable video .*bad.mp4"):
        load_video(tmp_path / "bad.mp4")


def test_mp4_without_pyav_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "c.mp4").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(MediaError, match="pip install av"):
        load_video(tmp_path / "c.mp4")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.gif", "not found"),
        (lambda p: (p / "x.gif").write_bytes(b"GIF89a\x20\x00\x20\x00broken") and p / "x.gif", "unreadable GIF"),
        (lambda p: (p / "x.gif").write_bytes(b"not a gif at all") and p / "x.gif", "unreadable GIF"),
        (lambda p: (p / "x.npy").write_bytes(b"\x93NUMPYbroken") and p / "x.npy", "unreadable .npy"),
        (lambda p: (p / "x.wav").write_bytes(b"RIFF....WAVEfmt ") and p / "x.wav", "not a video file"),
        (lambda p: (p / "x.txt").write_text("hello") and p / "x.txt", r"not a video file \(suffix '.txt'\)"),
        (lambda p: Image.new("RGB", (8, 8)).save(p / "x.png") or p / "x.png", "folder of frames"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "zero frames"),
    ],
)
def test_bad_files(tmp_path, make, match):
    with pytest.raises(MediaError, match=match):
        load_video(make(tmp_path))


def test_bad_npy_shape_names_the_file(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(MediaError, match=r"flat.npy.*\(frames, H, W, 3\)"):
        load_video(tmp_path / "flat.npy")


def test_frames_of_different_sizes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "1.png")
    with pytest.raises(MediaError, match="differ in size"):
        load_video(tmp_path)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), "zero frames"),
        (np.zeros((4, 8, 8), np.uint8), "must be"),
        (np.zeros((4, 8, 8, 4), np.uint8), "must be"),
        (np.zeros((8, 8, 3), np.uint8), "must be"),
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(MediaError, match=match):
        load_video(array)


def test_frame_indices_uniform():
    assert frame_indices(8, 8).tolist() == list(range(8))
    assert frame_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # a short clip repeats frames in order
    assert frame_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert frame_indices(1, 8).tolist() == [0] * 8


def test_preprocess_samples_resizes_and_normalises():
    clip = np.zeros((3, 20, 24, 3), np.uint8)
    for t in range(3):
        clip[t] = t * 100  # each frame a different grey, to see which ones were picked
    x = preprocess_video(clip, settings(num_frames=6, size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    assert x.shape == (6, 3, 16, 16)
    greys = x.mean((1, 2, 3)) * 255
    torch.testing.assert_close(greys, torch.tensor([0.0, 0, 100, 100, 200, 200]), atol=0.5, rtol=0)
    mean_grey = np.full((1, 32, 32, 3), np.rint(np.array(CLIP_MEAN) * 255), np.uint8)
    assert preprocess_video(mean_grey, settings()).abs().max() < 0.01  # the CLIP mean normalises to ~0


def test_tokenizer_shapes_and_gradients():
    tok = video_tokenizer(SimpleNamespace(hidden_size=24), {})
    assert tok.num_tokens == 65 and tok.hidden_size == 24
    assert (tok.num_frames, tok.size, tok.mean, tok.std) == (8, 32, CLIP_MEAN, CLIP_STD)
    clips = [synth_video(random.Random(s))[0] for s in range(3)]
    x = torch.stack([preprocess_video(c, tok) for c in clips])  # (3, 8, 3, 32, 32)
    out = tok(x)
    assert out.shape == (3, 65, 24)
    assert not torch.allclose(out[0, 1:], out[1, 1:])
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.parameters())


def test_tokenizer_sees_the_order_of_frames():
    tok = VideoTokenizer(16, tubelet=1)  # even one frame per tubelet: learned positions tell the times apart
    clip = torch.stack([preprocess_video(synth_video(random.Random(5))[0], tok)])
    reversed_clip = clip.flip(1)
    assert not torch.allclose(tok(clip), tok(reversed_clip))
    small = VideoTokenizer(16, num_frames=4, size=16, tubelet=2, patch=4)
    assert small.num_tokens == 1 + 2 * 16


def test_tokenizer_settings_are_checked():
    with pytest.raises(TypeError, match="frames"):
        video_tokenizer(SimpleNamespace(hidden_size=8), {"frames": 8})
    with pytest.raises(ValueError, match="tubelet"):
        VideoTokenizer(8, num_frames=7)
    with pytest.raises(ValueError, match="patch"):
        VideoTokenizer(8, size=30)
    with pytest.raises(ValueError, match=r"expects \(items, 8, 3, 32, 32\)"):
        VideoTokenizer(8)(torch.zeros(1, 4, 3, 32, 32))


def test_generator_deterministic_and_balanced():
    a, b = synth_video(random.Random(7)), synth_video(random.Random(7))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    rng = random.Random(8)
    seen = {q: set() for q in VIDEO.synthetic.questions}
    for _ in range(100):
        for q, answer in synth_video(rng)[1].items():
            seen[q].add(answer)
    assert seen == {
        "direction": {"left", "right", "up", "down"},
        "speed": {"slow", "fast"},
        "shape": {"circle", "square", "triangle"},
        "color": {"red", "green", "blue", "yellow"},
    }


def test_questions_and_caption():
    for phrasings in VIDEO.synthetic.questions.values():
        assert len(phrasings) == 3 and all(p.endswith(" ?") and p == p.lower() for p in phrasings)
    answers = {"direction": "left", "speed": "fast", "shape": "circle", "color": "red"}
    caption = VIDEO.synthetic.caption(answers, random.Random(0))
    assert caption.endswith("a fast red circle moving left")
    assert set(answers.values()) <= set(caption.split())
