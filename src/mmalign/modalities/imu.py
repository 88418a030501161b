"""The IMU modality: a worn device's inertial measurements over time, 6 channels per sample: accelerometer
x y z (m/s^2, gravity included, as a phone or watch reports it) then gyroscope x y z (rad/s), at 50 Hz.

Loads CSV with a header (acc_x, acc_y, acc_z, gyro_x, gyro_y, gyro_z in any order, after an optional leading
`time` or `timestamp` column, which is dropped), CSV without a header (exactly those 6 columns in that order),
`.npy` arrays of shape (T, 6), CSV or NPY bytes and in-memory arrays. Preprocessing crops the centre of a longer
recording or zero-pads a shorter one to `num_samples`, and rescales to O(1) units. The tokenizer is OneLLM's IMU
tokenizer (a 1-D convolution over time) with non-overlapping patches.

The embedded task: 4 s windows of an activity (walking, running, still, jumping, turning) recorded by a device
held flat (gravity along its z axis) or upright (along its y axis), with random tilt, heading, phase, amplitude
and noise, saved as CSV with a header."""

from __future__ import annotations

import csv
import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.modalities.base import MediaError, Modality, Synthetic, is_number, load_npy, read_bytes, register_modality

COLUMNS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
TIME_COLUMNS = ("time", "timestamp")
SAMPLE_RATE = 50  # Hz, what the embedded data is recorded at and the default window assumes
GRAVITY = 9.81
# Fixed units make values O(1) whatever the recording: acceleration in g, angular rate in turns per second.
# (Per-recording standardisation would erase what is asked: the gravity axis and how hard the motion is.)
UNITS = torch.tensor([GRAVITY] * 3 + [2 * math.pi] * 3)
WRONG_COLUMNS = "expected 6 columns (acc xyz, gyro xyz), got {}"


def _check_signal(values: np.ndarray, name: str) -> np.ndarray:
    """(T, 6) finite numbers with T > 0, as float32."""
    if values.dtype.kind not in "fiu":
        raise MediaError(f"{name}: an IMU recording holds numbers, got dtype {values.dtype}")
    if values.ndim != 2:
        raise MediaError(f"{name}: an IMU recording must be (T, 6) (acc xyz, gyro xyz), got {values.shape}")
    if values.shape[1] != 6:
        raise MediaError(f"{name}: {WRONG_COLUMNS.format(values.shape[1])}")
    if len(values) == 0:
        raise MediaError(f"{name}: empty IMU recording (no samples)")
    values = values.astype(np.float32)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise MediaError(f"{name}: NaN or infinite values (sample {int(bad.argmax())})")
    return np.ascontiguousarray(values)


def _parse_csv(text: str, name: str) -> np.ndarray:
    """The 6 IMU columns of a CSV text, in COLUMNS order; rows are named by their line in the file."""
    reader = csv.reader(io.StringIO(text))
    rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    if not rows:
        raise MediaError(f"{name}: empty IMU file (no samples)")
    order, width = list(range(6)), 6
    if not all(is_number(c) for c in rows[0][1]):
        header = [c.lower() for c in rows.pop(0)[1]]
        skip = 1 if header[0] in TIME_COLUMNS else 0
        names = header[skip:]
        if len(names) != 6:
            raise MediaError(f"{name}: {WRONG_COLUMNS.format(len(names))} ({','.join(header)})")
        if sorted(names) != sorted(COLUMNS):
            raise MediaError(f"{name}: header {','.join(header)} lacks {sorted(set(COLUMNS) - set(names))}")
        order, width = [skip + names.index(c) for c in COLUMNS], len(header)
    if not rows:
        raise MediaError(f"{name}: empty IMU file (a header, no samples)")
    values = np.empty((len(rows), 6), dtype=np.float64)
    for i, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise MediaError(f"{name}: row {line}: {WRONG_COLUMNS.format(len(cells) - (width - 6))}")
        for j, k in enumerate(order):
            try:
                values[i, j] = float(cells[k])
            except ValueError as err:
                raise MediaError(f"{name}: row {line}: non-numeric cell {cells[k]!r}") from err
        if not np.isfinite(values[i]).all():
            raise MediaError(f"{name}: row {line}: NaN or infinite values")
    return values


def load_imu(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """An IMU recording (T, 6) float32 (acc xyz in m/s^2, gyro xyz in rad/s) from a .csv or .npy path, CSV or
    NPY bytes, or an array. The file kind is read from its content, not its name."""
    if isinstance(source, np.ndarray):
        return _check_signal(source, "IMU array")
    data, name = read_bytes(source, "IMU")
    if data.startswith(b"\x93NUMPY"):
        return _check_signal(load_npy(data, name, "NPY IMU recording"), name)
    try:
        if b"\x00" in data[:4096]:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MediaError(f"{name}: not an IMU CSV/NPY file (binary content)") from err
    return _check_signal(_parse_csv(text, name), name)


def save_imu_csv(values: np.ndarray, path: str | Path, sample_rate: float = SAMPLE_RATE) -> None:
    """Write (T, 6) IMU values as CSV with a header, a leading time column in seconds."""
    values = np.asarray(values, dtype=np.float64)
    time = np.arange(len(values)) / sample_rate
    out = io.StringIO()
    out.write(",".join(("time",) + COLUMNS) + "\n")
    np.savetxt(out, np.column_stack([time, values]), fmt="%.9g", delimiter=",")
    Path(path).write_text(out.getvalue())


def preprocess_imu(raw: np.ndarray | torch.Tensor, encoder) -> torch.Tensor:
    """One recording as the encoder's fixed input (num_samples, 6): the centre `num_samples` of a longer one, a
    shorter one zero-padded at the end; acceleration in g, angular rate in turns per second."""
    x = torch.as_tensor(raw, dtype=torch.float32)
    n = encoder.num_samples
    if len(x) > n:
        start = (len(x) - n) // 2
        x = x[start : start + n]
    elif len(x) < n:
        x = torch.nn.functional.pad(x, (0, 0, 0, n - len(x)))
    return x / UNITS


class IMUTokenizer(nn.Module):
    """The onellm family's IMU tokenizer (OneLLM: a Conv1d over the 6 channels along time): here with stride =
    kernel = `patch`, so each token is one non-overlapping stretch of `patch` samples (0.2 s at 50 Hz), which
    keeps the token count modest. A learned class token first, learned positions.
    (items, num_samples, 6) -> (items, 1 + num_samples // patch, width)."""

    def __init__(self, width: int, *, num_samples: int = 200, patch: int = 10):
        super().__init__()
        if patch <= 0 or num_samples <= 0 or num_samples % patch:
            raise ValueError(f"num_samples ({num_samples}) must be a positive multiple of patch ({patch})")
        self.num_samples, self.patch = num_samples, patch
        self.hidden_size = width
        self.num_tokens = 1 + num_samples // patch
        self.conv = nn.Conv1d(6, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        x = self.conv(signal.transpose(1, 2)).transpose(1, 2)  # (items, num_samples // patch, width)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


def imu_tokenizer(universal, settings: dict) -> IMUTokenizer:
    return IMUTokenizer(universal.hidden_size, **settings)


# ---- the embedded task -------------------------------------------------------------------------------------------
ACTIVITIES = ("walking", "running", "still", "jumping", "turning")
ORIENTATIONS = ("flat", "upright")
SECONDS = 4.0
# Gait activities: step rate (Hz) and vertical bounce amplitude (m/s^2) ranges; turning walks slowly and gently.
GAIT = {"walking": ((1.8, 2.2), (1.5, 3.0)), "running": ((2.6, 3.2), (7.0, 11.0)), "turning": ((1.6, 2.2), (0.5, 1.0))}
QUESTIONS = {
    "activity": ["what is the person doing ?", "which activity is it ?", "what activity does the motion show ?"],
    "orientation": ["how is the device held ?", "what is the device orientation ?", "is the device flat or upright ?"],
}
CAPTIONS = ["{activity} with the device {orientation}", "the wearer is {activity} , the device held {orientation}",
            "imu of {activity} with a device held {orientation}"]  # fmt: skip


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: the rotation by `angle` about the unit vector `axis`."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def body_motion(activity: str, t: np.ndarray, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """World-frame (z up) acceleration (T, 3) without gravity, in m/s^2, and angular rate (T, 3) in rad/s."""
    acc, gyro = np.zeros((len(t), 3)), np.zeros((len(t), 3))
    phase = g.uniform(0, 2 * np.pi, 4)
    if activity in ("walking", "running", "turning"):
        # Gait: a vertical bounce at the step rate with its second harmonic, a forward surge at the step rate and
        # a sideways sway at half of it (one sway per stride of two steps).
        (f_lo, f_hi), (a_lo, a_hi) = GAIT[activity]
        freq, amp = g.uniform(f_lo, f_hi), g.uniform(a_lo, a_hi)
        w = 2 * np.pi * freq * t
        acc[:, 2] = amp * (np.sin(w + phase[0]) + 0.3 * np.sin(2 * w + phase[1]))
        acc[:, 0] = 0.4 * amp * np.sin(w + phase[2])
        acc[:, 1] = 0.25 * amp * np.sin(w / 2 + phase[3])
        gyro[:, :2] = 0.05 * amp * np.sin(w[:, None] / 2 + phase[:2])
    if activity == "turning":
        gyro[:, 2] = g.choice([-1.0, 1.0]) * g.uniform(0.8, 1.6) * (1 + 0.1 * np.sin(0.5 * t + phase[0]))
    if activity == "jumping":
        # Jumps at ~1 Hz: free fall in the air (specific force 0, i.e. acceleration -g), then a half-sine push on
        # the ground whose area gives the mean specific force g over each jump (the body ends where it started).
        freq, flight = g.uniform(0.8, 1.2), g.uniform(0.4, 0.55)
        cycle = (freq * t + phase[0] / (2 * np.pi)) % 1.0  # [0, 1): ground first, then the air
        ground = cycle < 1 - flight
        peak = g.uniform(0.9, 1.1) * np.pi * GRAVITY / (2 * (1 - flight))
        acc[:, 2] = np.where(ground, peak * np.sin(np.pi * cycle / (1 - flight)), 0.0) - GRAVITY
        gyro[:, :2] = 0.3 * np.sin(2 * np.pi * freq * t[:, None] + phase[1:3])
    return acc, gyro


def make_imu(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """(200, 6) float32 accelerometer (m/s^2, gravity included) + gyroscope (rad/s) in the device's frame."""
    g = np.random.default_rng(rng.randrange(2**32))
    activity, orientation = rng.choice(ACTIVITIES), rng.choice(ORIENTATIONS)
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    acc, gyro = body_motion(activity, t, g)
    acc[:, 2] += GRAVITY  # an accelerometer measures specific force: +g upwards when at rest
    # Device -> world: flat keeps the device's z up; upright turns its y up (a quarter turn about x); then a small
    # tilt about a random horizontal axis and a random heading about the vertical.
    base = np.eye(3) if orientation == "flat" else _rotation(np.array([1.0, 0.0, 0.0]), np.pi / 2)
    tilt_direction = g.uniform(0, 2 * np.pi)
    tilt_axis = np.array([math.cos(tilt_direction), math.sin(tilt_direction), 0.0])
    rotation = _rotation(np.array([0.0, 0.0, 1.0]), g.uniform(0, 2 * np.pi))
    rotation = rotation @ _rotation(tilt_axis, np.radians(g.uniform(0, 15))) @ base
    acc_dev, gyro_dev = acc @ rotation, gyro @ rotation  # rows: R^T v, world -> device
    acc_dev += g.normal(0, g.uniform(0.05, 0.2), acc_dev.shape)
    gyro_dev += g.normal(0, g.uniform(0.01, 0.05), gyro_dev.shape)
    values = np.concatenate([acc_dev, gyro_dev], axis=1).astype(np.float32)
    return values, {"activity": activity, "orientation": orientation}


def imu_caption(answers: dict[str, str], rng: random.Random) -> str:
    return rng.choice(CAPTIONS).format(**answers)


IMU = register_modality(
    Modality(
        name="imu",
        placeholder="<imu>",
        record_key="imu",
        default_encoder="modality-transformer",
        load=load_imu,
        preprocess=preprocess_imu,
        tokenizer=imu_tokenizer,
        synthetic=Synthetic(
            make=make_imu,
            save=save_imu_csv,
            suffix=".csv",
            questions=QUESTIONS,
            caption=imu_caption,
        ),
    )
)
