"""A second embedded dataset, unlike shapes: two stroke-drawn digits on a textured background.

Each 64x64 image holds two handwritten-style digits, one in each half, drawn as thick round-capped polylines
with PIL (no system fonts, so it renders the same on any machine) over stripes, checks, dots or a plain gradient.
Each digit has its own identity (10 ways), ink colour (6), size (small or large) and may be underlined.
Height, width, stroke width, position, a slight rotation, the texture's phase and period and all colours are
jittered; shapes, by contrast, has filled blobs on flat noise with scene-wide attributes.

It exists to show that the toolkit's defaults work on a user's own LLaVA-format data with no per-dataset
tuning: question types have different arity (2, 3, 3, 4, 6 and 10 ways), two of them are relations between
the digits, and every answer is a single lowercase word that is (close to) balanced within its type and not
given away by the question wording, so a blind model stays near the majority rate. Every attribute is a
coarse, high-contrast mark (digits are 21-33 px tall with 3-5 px strokes) so a tiny patch-8 ViT can see it.

No tokenizer is written: the toolkit must build its own from this text, as it would for a user's data.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmalign.data.shapes import write_splits

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Each digit as polylines in a unit box (x right, y down), in a handwritten style rather than seven segments:
# diagonals, loops and flags make every pair differ in several strokes, not in a single bar.
STROKES_OF = {
    "zero": [[(0.5, 0), (0.9, 0.12), (1, 0.5), (0.9, 0.88), (0.5, 1), (0.1, 0.88), (0, 0.5), (0.1, 0.12), (0.5, 0)]],
    "one": [[(0.1, 0.3), (0.6, 0), (0.6, 1)]],  # no foot: it would read as an underline
    "two": [[(0, 0.22), (0.3, 0), (0.75, 0), (1, 0.25), (0, 1), (1, 1)]],
    "three": [[(0, 0), (1, 0), (0.35, 0.42), (0.8, 0.5), (1, 0.75), (0.75, 1), (0, 0.95)]],
    "four": [[(0.75, 1), (0.75, 0), (0, 0.68), (1, 0.68)]],
    "five": [[(1, 0), (0.1, 0), (0, 0.45), (0.7, 0.4), (1, 0.7), (0.7, 1), (0, 0.95)]],
    "six": [
        [(0.85, 0), (0.15, 0.45), (0, 0.75), (0.25, 1), (0.75, 1), (1, 0.75), (0.75, 0.5), (0.25, 0.5), (0.05, 0.65)]
    ],
    "seven": [[(0, 0), (1, 0), (0.35, 1)]],
    "eight": [
        [(0.5, 0), (0.9, 0.22), (0.5, 0.45), (0.1, 0.22), (0.5, 0)],
        [(0.5, 0.45), (1, 0.72), (0.5, 1), (0, 0.72), (0.5, 0.45)],
    ],
    "nine": [
        [(0.95, 0.5), (0.75, 0.5), (0.25, 0.5), (0, 0.25), (0.25, 0), (0.75, 0), (1, 0.25), (0.95, 0.5), (0.6, 1)]
    ],
}

# Saturated or extreme inks over mid-grey backgrounds (tones about 75-190), so the ink never blends in.
COLORS = {
    "red": (225, 30, 30),
    "green": (30, 185, 50),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 30),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
# Digit height in pixels at 64 px; the gap (about 10 px, more than a patch) keeps "bigger" unambiguous.
SIZES = {"small": 22, "large": 32}
STROKES = {"small": (3, 4), "large": (4, 5)}
JITTER = 1  # pixels each way, at 64 px
ROTATION = 2  # degrees each way
UNDERLINE_ROOM = 10  # pixels kept free under each digit for its underline
PATTERNS = ["stripes", "checks", "dots", "plain"]
UNDERLINES = ["none", "left", "right", "both"]
SIDES = ["left", "right"]

# Every scene attribute and its values, in a fixed order (class indices for probes and heads).
ATTRIBUTES = {
    "pattern": PATTERNS,
    "left_digit": DIGITS,
    "right_digit": DIGITS,
    "left_color": list(COLORS),
    "right_color": list(COLORS),
    "left_size": list(SIZES),
    "right_size": list(SIZES),
    "underlined": UNDERLINES,
}

# "{side}" is filled with left or right at random, so the wording never predicts the answer.
QUESTIONS = {
    "pattern": [
        "what is the background pattern ?",
        "what pattern is behind the digits ?",
        "what does the background look like ?",
    ],
    "digit": ["what digit is on the {side} ?", "which number is on the {side} ?", "read the {side} digit ."],
    "color": [
        "what colour is the {side} digit ?",
        "which color is the number on the {side} ?",
        "what color is the {side} digit drawn in ?",
    ],
    "same_color": [
        "are the two digits the same colour ?",
        "do both numbers have the same color ?",
        "is the left digit the same color as the right digit ?",
    ],
    "bigger": [
        "which digit is bigger , the left or the right ?",
        "which number is larger ?",
        "is the left or the right digit bigger ?",
    ],
    "underlined": [
        "how many digits are underlined ?",
        "how many underlines are there ?",
        "count the underlined digits .",
    ],
}
# The possible answers of each question type (for balance checks and blind baselines).
ANSWERS = {
    "pattern": PATTERNS,
    "digit": DIGITS,
    "color": list(COLORS),
    "same_color": ["yes", "no"],
    "bigger": ["left", "right", "same"],
    "underlined": ["zero", "one", "two"],
}
CAPTION_PROMPTS = ["describe the picture .", "what does the image show ?", "write a short caption ."]
CAPTION_PREFIXES = ["", "an image of ", "this shows "]
BACKGROUND_PHRASES = {"stripes": "stripes", "checks": "checks", "dots": "dots", "plain": "a plain background"}
UNDERLINE_PHRASES = {
    "none": "nothing underlined",
    "left": "the left digit underlined",
    "right": "the right digit underlined",
    "both": "both underlined",
}
SPLIT_SEEDS = {"train": 11, "val": 12, "test": 13}


@dataclass
class Scene:
    pattern: str
    left_digit: str
    right_digit: str
    left_color: str
    right_color: str
    left_size: str
    right_size: str
    underlined: str

    def answer(self, qtype: str, side: str = "left") -> str:
        """The one-word answer to a question of `qtype`; `side` matters for digit and color only."""
        if qtype == "pattern":
            return self.pattern
        if qtype == "digit":
            return getattr(self, f"{side}_digit")
        if qtype == "color":
            return getattr(self, f"{side}_color")
        if qtype == "same_color":
            return "yes" if self.left_color == self.right_color else "no"
        if qtype == "bigger":
            if self.left_size == self.right_size:
                return "same"
            return "left" if self.left_size == "large" else "right"
        if qtype == "underlined":
            return ANSWERS["underlined"][{"none": 0, "left": 1, "right": 1, "both": 2}[self.underlined]]
        raise ValueError(f"unknown question type {qtype!r}")

    def caption(self, rng: random.Random) -> str:
        left = f"a {self.left_size} {self.left_color} {self.left_digit}"
        right = f"a {self.right_size} {self.right_color} {self.right_digit}"
        return (
            f"{rng.choice(CAPTION_PREFIXES)}{left} and {right} on {BACKGROUND_PHRASES[self.pattern]} , "
            f"{UNDERLINE_PHRASES[self.underlined]}"
        )


def random_scene(rng: random.Random) -> Scene:
    """Draw the relations first (same colour, which is bigger, how many underlines) so those answers are
    balanced too; each digit's own colour and size stay uniform."""
    left_color = rng.choice(list(COLORS))
    right_color = left_color if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != left_color])
    bigger = rng.choice(ANSWERS["bigger"])
    if bigger == "same":
        left_size = right_size = rng.choice(list(SIZES))
    else:
        left_size, right_size = ("large", "small") if bigger == "left" else ("small", "large")
    n_underlined = rng.randrange(3)
    underlined = ["none", rng.choice(["left", "right"]), "both"][n_underlined]
    return Scene(
        pattern=rng.choice(PATTERNS),
        left_digit=rng.choice(DIGITS),
        right_digit=rng.choice(DIGITS),
        left_color=left_color,
        right_color=right_color,
        left_size=left_size,
        right_size=right_size,
        underlined=underlined,
    )


# ----------------------------------------------------------------------------------------------- drawing
def draw_background(pattern: str, rng: random.Random, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: two grey-ish tones about 30 apart laid out in the pattern, plus faint noise.
    Periods are 5-10 px, so every patch-8 token holds a telltale piece of the texture."""
    np_rng = np.random.default_rng(rng.randrange(2**32))
    scale = size / 64
    base = rng.randint(115, 150) + np.array([rng.randint(-10, 10) for _ in range(3)])
    alt = base + rng.choice([-30, 30])
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / scale
    if pattern == "stripes":
        period = rng.choice([6, 8, 10])
        mask = ((x + rng.choice([-1, 1]) * y + rng.randrange(period)) // (period / 2)) % 2 == 1
    elif pattern == "checks":
        cell = rng.choice([5, 6, 7, 8])
        mask = ((x + rng.randrange(cell)) // cell + (y + rng.randrange(cell)) // cell) % 2 == 1
    elif pattern == "dots":
        gap = rng.choice([6, 7, 8])
        dx = (x + rng.randrange(gap)) % gap - gap / 2
        dy = (y + rng.randrange(gap)) % gap - gap / 2
        mask = dx**2 + dy**2 <= 2.3
    else:
        mask = np.zeros((size, size), dtype=bool)
    pixels = np.where(mask[..., None], alt, base).astype(np.float64)
    if pattern == "plain":
        # A gentle gradient, so "plain" is not a single flat colour a probe could key on.
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * x + math.sin(angle) * y) / 64 - 0.5
        pixels += rng.uniform(10, 25) * ramp[..., None]
    pixels += np_rng.normal(0, 4, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def glyph_strokes(digit: str, box: tuple[float, float, float, float], angle: float) -> list[list[tuple]]:
    """Polylines of `digit` in box (x0, y0, width, height), rotated by `angle` radians about its centre."""
    x0, y0, w, h = box
    cx, cy = x0 + w / 2, y0 + h / 2
    cos, sin = math.cos(angle), math.sin(angle)

    def place(u: float, v: float) -> tuple[float, float]:
        px, py = (u - 0.5) * w, (v - 0.5) * h
        return (cx + cos * px - sin * py, cy + sin * px + cos * py)

    return [[place(u, v) for u, v in line] for line in STROKES_OF[digit]]


def _jitter_color(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in rgb)


def draw_glyph(draw: ImageDraw.ImageDraw, scene: Scene, side: str, rng: random.Random, size: int = 64) -> None:
    """One digit at the middle of its half, with round caps so strokes join cleanly. Position jitter is kept to a
    pixel: a tiny ViT trained from scratch on a few thousand images has no translation invariance to spare (with
    3 px of jitter and 5 degrees of rotation a supervised tiny ViT read digits at about 45% after 15 epochs; at
    1 px, about 80%, on a par with shapes' shape attribute)."""
    scale = size / 64
    label = getattr(scene, f"{side}_size")
    h = (SIZES[label] + rng.randint(-1, 1)) * scale
    w = h * rng.uniform(0.52, 0.58)
    stroke = max(1, round(rng.randint(*STROKES[label]) * scale))
    centre_x = (size / 4 if side == "left" else 3 * size / 4) + rng.uniform(-JITTER, JITTER) * scale
    # Room for an underline is always kept below, so an underline never moves the digit.
    centre_y = (size - UNDERLINE_ROOM * scale) / 2 + rng.uniform(-JITTER, JITTER) * scale
    x0, y0 = centre_x - w / 2, centre_y - h / 2
    fill = _jitter_color(COLORS[getattr(scene, f"{side}_color")], rng)
    angle = math.radians(rng.uniform(-ROTATION, ROTATION))
    r = stroke / 2
    for line in glyph_strokes(getattr(scene, f"{side}_digit"), (x0, y0, w, h), angle):
        draw.line(line, fill=fill, width=stroke, joint="curve")
        for px, py in (line[0], line[-1]):
            draw.ellipse((px - r, py - r, px + r, py + r), fill=fill)
    if scene.underlined in (side, "both"):
        bar_y = y0 + h + 6 * scale  # a clear gap, so the bar never merges with a bottom stroke
        draw.rectangle((x0 - 2 * scale, bar_y, x0 + w + 2 * scale, bar_y + 4 * scale - 1), fill=fill)


def draw_scene(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.fromarray(draw_background(scene.pattern, rng, size), "RGB")
    draw = ImageDraw.Draw(img)
    for side in SIDES:
        draw_glyph(draw, scene, side, rng, size)
    return img


# ----------------------------------------------------------------------------------------------- text
def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """A question of `qtype` about `scene` (random wording and side) and its answer."""
    side = rng.choice(SIDES)
    return rng.choice(QUESTIONS[qtype]).format(side=side), scene.answer(qtype, side)


def _caption_record(scene: Scene, name: str, i: int, rng: random.Random) -> dict:
    return {
        "id": f"cap-{i}",
        "image": name,
        "conversations": [
            {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
            {"from": "gpt", "value": scene.caption(rng)},
        ],
    }


def _conversation_record(scene: Scene, name: str, i: int, rng: random.Random) -> dict:
    turns = []
    for j, qtype in enumerate(rng.sample(list(QUESTIONS), 3)):
        q, a = ask(scene, qtype, rng)
        turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": f"conv-{i}", "image": name, "conversations": turns}


def _qa_records(scene: Scene, name: str, split: str, i: int, rng: random.Random) -> list[dict]:
    # Every question type once per held-out image, so the per-type table is balanced.
    records = []
    for qtype in QUESTIONS:
        q, a = ask(scene, qtype, rng)
        records.append(
            {
                "id": f"{split}-{i}-{qtype}",
                "image": name,
                "question_type": qtype,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    return records


def write_glyphs_dataset(
    out_dir: str | Path, n_train: int = 3000, n_val: int = 100, n_test: int = 200, image_size: int = 64, seed: int = 0
) -> dict[str, str]:
    """Write images/, captions_train.json, conversations_train.json, qa_val.json, qa_test.json and scenes.json.
    Each split has its own random stream, so test images never repeat training ones. Returns the paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions: list[dict] = []
    conversations: list[dict] = []
    qa: dict[str, list[dict]] = {"val": [], "test": []}
    scenes: dict[str, dict] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(seed * 7919 + SPLIT_SEEDS[split])
        for i in range(n):
            scene = random_scene(rng)
            name = f"{split}_{i:05d}.png"
            draw_scene(scene, rng, image_size).save(out / "images" / name)
            scenes[name] = asdict(scene)
            if split == "train":
                captions.append(_caption_record(scene, name, i, rng))
                conversations.append(_conversation_record(scene, name, i, rng))
            else:
                qa[split] += _qa_records(scene, name, split, i, rng)
    paths = write_splits(out, captions, conversations, qa) | {"scenes": out / "scenes.json"}
    paths["scenes"].write_text(json.dumps(scenes, indent=1))
    return {k: str(v) for k, v in paths.items()}
