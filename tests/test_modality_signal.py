"""The signal modality: .npy and .csv files and arrays load as (channels, time); bad inputs are named;
preprocessing crops, pads and z-scores to a fixed shape; the tokenizer gives one token per channel; the synthetic
items carry their answers after z-scoring (the responding region's mean is the one that peaks, and when)."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import soundfile
import torch

from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.signal import (
    REGIONS,
    TIMINGS,
    SignalTokenizer,
    load_signal,
    preprocess_signal,
    signal_tokenizer,
)

SIGNAL = get_modality("signal")
SETTINGS = types.SimpleNamespace(channels=16, length=32)


def test_npy_csv_bytes_and_arrays_load_as_channels_by_time(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(load_signal(tmp_path / "a.npy"), x)
    np.testing.assert_array_equal(load_signal((tmp_path / "a.npy").read_bytes()), x)
    np.save(tmp_path / "one.npy", x[0].astype(np.float64))
    one = load_signal(str(tmp_path / "one.npy"))
    assert one.shape == (1, 40) and one.dtype == np.float32  # a vector is one channel
    np.testing.assert_array_equal(one, x[:1])
    # CSV: rows are time points, columns channels; a header of channel names is skipped.
    np.savetxt(tmp_path / "a.csv", x.T, delimiter=",", fmt="%.9g")
    np.testing.assert_allclose(load_signal(tmp_path / "a.csv"), x, rtol=1e-6)
    header = ",".join(f"roi{i}" for i in range(5)) + "\n"
    (tmp_path / "h.csv").write_text(header + (tmp_path / "a.csv").read_text())
    np.testing.assert_allclose(load_signal(tmp_path / "h.csv"), x, rtol=1e-6)
    np.testing.assert_allclose(load_signal((tmp_path / "h.csv").read_bytes()), x, rtol=1e-6)
    np.testing.assert_array_equal(load_signal(x.astype(np.int64)), x.astype(np.int64).astype(np.float32))
    np.testing.assert_array_equal(load_signal(torch.from_numpy(x)), x)


def test_bad_inputs_raise_media_errors_naming_the_problem(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan, 1.0]]))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "empty.npy", np.zeros((0, 5)))
    (tmp_path / "words.csv").write_text("1,2\n3,oops\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    (tmp_path / "header_only.csv").write_text("a,b\n")
    (tmp_path / "inf.csv").write_text("1,2\ninf,3\n")
    soundfile.write(tmp_path / "sound.wav", np.zeros(100, np.float32), 8000)
    (tmp_path / "sound.npy").write_bytes((tmp_path / "sound.wav").read_bytes())
    (tmp_path / "cut.npy").write_bytes((tmp_path / "nan.npy").read_bytes()[:-8])
    cases = [
        (tmp_path / "missing.npy", "not found"),
        (tmp_path / "nan.npy", r"nan\.npy: NaN in signal \(channel 0, time 1\)"),
        (tmp_path / "text.npy", "must be numeric"),
        (tmp_path / "cube.npy", "3-D"),
        (tmp_path / "empty.npy", "empty signal"),
        (tmp_path / "words.csv", r"row 2: not numeric: 'oops'"),
        (tmp_path / "ragged.csv", "row 2 has 1 columns"),
        (tmp_path / "header_only.csv", "empty signal"),
        (tmp_path / "inf.csv", "infinite value in signal"),
        (tmp_path / "sound.wav", "unsupported signal format '.wav'"),
        (tmp_path / "sound.npy", r"sound\.npy: not a \.npy signal \(a WAV audio file\)"),
        (tmp_path / "cut.npy", "unreadable .npy"),
        (np.array([1.0, np.nan]), "NaN in signal"),
        (np.zeros((2, 2, 2)), "3-D"),
        (np.zeros((3, 0)), "empty signal"),
        (b"\x00\x01binary", "binary content"),
    ]
    for source, message in cases:
        with pytest.raises(MediaError, match=message):
            load_signal(source)


def test_preprocess_crops_pads_and_z_scores_each_channel():
    g = np.random.default_rng(1)
    x = g.normal(5.0, 3.0, size=(20, 50)).astype(np.float32)
    out = preprocess_signal(x, SETTINGS)
    assert out.shape == (16, 32) and out.dtype == torch.float32
    want = (x[:16, :32] - x[:16, :32].mean(1, keepdims=True)) / x[:16, :32].std(1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    small = np.stack([g.normal(size=10), np.full(10, 7.0)]).astype(np.float32)  # a constant channel
    out = preprocess_signal(small, SETTINGS)
    assert out.shape == (16, 32) and torch.isfinite(out).all()
    assert out[0, :10].mean().abs() < 1e-5 and out[0, :10].std(correction=0) == pytest.approx(1.0, abs=1e-4)
    assert (out[1] == 0).all() and (out[2:] == 0).all() and (out[:, 10:] == 0).all()
    assert preprocess_signal(g.normal(size=40), types.SimpleNamespace(channels=2, length=8)).shape == (2, 8)


def test_tokenizer_gives_a_token_per_channel_with_gradients_and_checks_settings():
    tok = signal_tokenizer(types.SimpleNamespace(hidden_size=24), {})
    assert (tok.hidden_size, tok.num_tokens, tok.channels, tok.length) == (24, 17, 16, 32)
    g = np.random.default_rng(2)
    items = torch.stack([preprocess_signal(g.normal(size=(16, 32)), tok) for _ in range(3)])
    out = tok(items)
    assert out.shape == (3, 17, 24)
    assert (out[0, 1:] - out[1, 1:]).abs().max() > 1e-3  # different signals, different tokens
    swapped = items.clone()
    swapped[0, [0, 1]] = items[0, [1, 0]]
    assert not torch.allclose(tok(swapped)[0, 1], out[0, 1])  # a channel's token knows which channel it is
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.parameters())
    assert SignalTokenizer(8, channels=4, length=10).num_tokens == 5
    with pytest.raises(TypeError, match="width_scale"):
        signal_tokenizer(types.SimpleNamespace(hidden_size=8), {"width_scale": 2})
    with pytest.raises(ValueError, match="channels"):
        SignalTokenizer(8, channels=0)


def hand_answers(z: np.ndarray) -> dict[str, str]:
    """From a preprocessed (z-scored) item: the region whose 4-channel mean, lightly smoothed, peaks highest;
    early when that peak lies in the first half."""
    means = z.reshape(4, 4, -1).mean(1)  # (regions, time)
    smooth = np.stack([np.convolve(m, np.ones(3) / 3, mode="same") for m in means])
    region = int(smooth.max(1).argmax())
    return {"region": REGIONS[region], "timing": "early" if smooth[region].argmax() < z.shape[1] / 2 else "late"}


def test_synthetic_items_round_trip_and_their_answers_survive_z_scoring(tmp_path):
    synth = SIGNAL.synthetic
    rng = random.Random(0)
    agree = {q: 0 for q in synth.questions}
    for i in range(60):
        raw, answers = synth.make(rng)
        assert raw.shape == (16, 32) and raw.dtype == np.float32
        synth.save(raw, tmp_path / f"s{i}{synth.suffix}")
        loaded = SIGNAL.load(tmp_path / f"s{i}{synth.suffix}")
        np.testing.assert_array_equal(loaded, raw)
        z = SIGNAL.preprocess(loaded, SignalTokenizer(8))
        assert z.shape == (16, 32)
        hand = hand_answers(z.numpy())
        for q in agree:
            agree[q] += hand[q] == answers[q]
    assert synth.suffix == ".npy" and all(n >= 0.9 * 60 for n in agree.values()), agree


def test_synthetic_items_are_deterministic_balanced_and_described():
    synth = SIGNAL.synthetic
    a, b = synth.make(random.Random(3)), synth.make(random.Random(3))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    draws = [synth.make(random.Random(s))[1] for s in range(100)]
    assert {d["region"] for d in draws} == set(REGIONS) and {d["timing"] for d in draws} == set(TIMINGS)
    assert set(synth.questions) == {"region", "timing"}
    for phrasings in synth.questions.values():
        assert len(phrasings) == 3 and all(p == p.lower() and p.endswith(" ?") for p in phrasings)
    for seed in range(5):
        raw, answers = synth.make(random.Random(seed))
        caption = synth.caption(answers, random.Random(seed))
        assert caption == caption.lower() and all(word in caption.split() for word in answers.values())
    assert SIGNAL.placeholder == "<signal>" and SIGNAL.record_key == "signal"
