"""The embedded default: a procedural "shapes" world written as PNG files plus LLaVA-format JSON.

Each image holds 1-3 objects sharing a colour, shape and size, all in the left or right half. Stage 1 gets
captions, stage 2 multi-turn question-answer conversations; val/test are single questions tagged with a
`question_type`. Splits come from disjoint seeds, so test images are never seen in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmalign.data.tokenizer import build_word_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = {"small": 5, "large": 9}
COUNTS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ["left", "right"]

# Every scene attribute and its values, in a fixed order (class indices for probes and heads).
ATTRIBUTES = {
    "color": list(COLORS),
    "shape": SHAPES,
    "size": list(SIZES),
    "count": list(COUNTS),
    "position": POSITIONS,
}

QUESTIONS = {
    "color": ["what color is the shape ?", "what colour are the objects ?", "which color do you see ?"],
    "shape": ["what shape is shown ?", "which shape do you see ?", "what kind of shape is it ?"],
    "size": ["are the shapes small or large ?", "what size is the object ?", "how big are the shapes ?"],
    "count": ["how many shapes are there ?", "how many objects can you see ?", "count the shapes ."],
    "position": ["is it on the left or the right ?", "where are the shapes ?", "which side are the objects on ?"],
}
CAPTION_PREFIXES = ["", "a picture of ", "there is ", "an image with "]
CAPTION_PROMPTS = ["describe the image .", "what is in the picture ?", "give a short caption ."]
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


@dataclass
class Scene:
    color: str
    shape: str
    size: str
    count: int
    position: str

    def answer(self, qtype: str) -> str:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "count": COUNTS[self.count],
            "position": self.position,
        }[qtype]

    def caption(self, rng: random.Random) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return (
            f"{rng.choice(CAPTION_PREFIXES)}{COUNTS[self.count]} {self.size} {self.color} {noun} on the {self.position}"
        )


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        count=rng.choice(list(COUNTS)),
        position=rng.choice(POSITIONS),
    )


def draw_scene(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Objects sit in distinct vertical slots of their half, so they never overlap."""
    shade = rng.randint(190, 240)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (size, size, 3))
    pixels = np.clip(shade + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    r = SIZES[scene.size]
    half = size // 2
    x0 = 0 if scene.position == "left" else half
    slot_h = size // 3
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[scene.color])
    for slot in rng.sample(range(3), scene.count):
        cx = x0 + rng.randint(r + 1, half - r - 2)
        cy = slot * slot_h + rng.randint(min(r + 1, slot_h // 2), max(slot_h - r - 1, slot_h // 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def _qa(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    return rng.choice(QUESTIONS[qtype]), scene.answer(qtype)


def write_shapes_dataset(
    out_dir: str | Path,
    n_train: int = 3000,
    n_val: int = 100,
    n_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    n_episodes: int = 8000,
) -> dict:
    """Write images/, captions_train.json, conversations_train.json, qa_val.json, qa_test.json, scenes.json,
    a word-level tokenizer/ built from the text and, with n_episodes, the in-context episodes of write_fewshot.
    Returns the paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, conversations, qa = [], [], {"val": [], "test": []}
    scenes: dict[str, dict] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(seed * 7919 + SPLIT_SEEDS[split])
        for i in range(n):
            scene = random_scene(rng)
            name = f"{split}_{i:05d}.png"
            draw_scene(scene, rng, image_size).save(out / "images" / name)
            scenes[name] = asdict(scene)
            if split == "train":
                captions.append(
                    {
                        "id": f"cap-{i}",
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
                            {"from": "gpt", "value": scene.caption(rng)},
                        ],
                    }
                )
                turns = []
                for j, qtype in enumerate(rng.sample(list(QUESTIONS), 3)):
                    q, a = _qa(scene, qtype, rng)
                    turns += [
                        {"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                        {"from": "gpt", "value": a},
                    ]
                conversations.append({"id": f"conv-{i}", "image": name, "conversations": turns})
            else:
                # Every question type once per held-out image, so the per-type table is balanced.
                for qtype in QUESTIONS:
                    q, a = _qa(scene, qtype, rng)
                    qa[split].append(
                        {
                            "id": f"{split}-{i}-{qtype}",
                            "image": name,
                            "question_type": qtype,
                            "conversations": [
                                {"from": "human", "value": f"<image>\n{q}"},
                                {"from": "gpt", "value": a},
                            ],
                        }
                    )
    paths = write_splits(out, captions, conversations, qa) | {"tokenizer": out / "tokenizer"}
    (out / "scenes.json").write_text(json.dumps(scenes))
    build_word_tokenizer(corpus_texts(captions + conversations + qa["val"] + qa["test"]), paths["tokenizer"])
    episodes = write_fewshot(out, n_docs=n_episodes, seed=seed) if n_episodes else {}
    return {k: str(v) for k, v in paths.items()} | episodes


def write_splits(out: Path, captions: list, conversations: list, qa: dict[str, list]) -> dict[str, Path]:
    """The LLaVA-format files every embedded dataset writes, and their paths (plus the image folder)."""
    paths = {
        "captions": out / "captions_train.json",
        "conversations": out / "conversations_train.json",
        "val": out / "qa_val.json",
        "test": out / "qa_test.json",
    }
    for key, data in (
        ("captions", captions),
        ("conversations", conversations),
        ("val", qa["val"]),
        ("test", qa["test"]),
    ):
        paths[key].write_text(json.dumps(data, indent=1))
    return paths | {"images": out / "images"}


def load_split(data_dir: str | Path, split: str, encoder) -> tuple[torch.Tensor, list[dict]]:
    """Every image of a split ("train", "val", "test") preprocessed for `encoder`, with its scene attributes:
    ((N, 3, H, W), [scene dict, ...]) in file-name order."""
    from mmalign.modalities.image import load_image, preprocess_image

    data_dir = Path(data_dir)
    scenes = json.loads((data_dir / "scenes.json").read_text())
    names = sorted(n for n in scenes if n.startswith(f"{split}_"))
    size, mean, std = encoder.image_size, encoder.mean, encoder.std
    pixels = torch.stack([preprocess_image(load_image(data_dir / "images" / n), size, mean, std) for n in names])
    return pixels, [scenes[n] for n in names]


def corpus_texts(records: list[dict]) -> list[str]:
    return [turn["value"] for rec in records for turn in rec["conversations"]]


def fewshot_files(data_dir: str | Path) -> dict[str, Path]:
    """Where write_fewshot puts the episodes, the support set and the few-shot test set."""
    out = Path(data_dir)
    return {
        "interleaved": out / "interleaved_train.jsonl",
        "support": out / "fewshot_support.json",
        "fewshot_test": out / "fewshot_test.json",
    }


def write_fewshot(
    data_dir: str | Path, n_docs: int = 3000, n_support: int = 200, max_images: int = 9, seed: int = 0
) -> dict[str, str]:
    """In-context episodes over an existing shapes folder (its scenes.json), for the Flamingo family.

    The attribute an episode is about is never named: every chunk is `<image>{answer}<|endofchunk|>` with the
    answers of one hidden attribute, so only the demonstrations say what to answer. Writes
    interleaved_train.jsonl (MMC4-shaped documents of 2 to max_images train images), fewshot_support.json (train
    images, one record per attribute) and fewshot_test.json (held-out test images, one record per attribute)."""
    out = Path(data_dir)
    scenes = {name: Scene(**s) for name, s in json.loads((out / "scenes.json").read_text()).items()}
    train = sorted(n for n in scenes if n.startswith("train_"))
    test = sorted(n for n in scenes if n.startswith("test_"))
    if len(train) < 2:
        raise ValueError(f"{out}: in-context episodes need at least 2 training images, found {len(train)}")
    max_images = min(max_images, len(train))
    rng = random.Random(seed * 7919 + 11)
    docs = []
    for i in range(n_docs):
        qtype, names = rng.choice(list(QUESTIONS)), rng.sample(train, rng.randint(2, max_images))
        docs.append(
            {
                "id": f"episode-{i}",
                "text_list": [scenes[n].answer(qtype) for n in names],
                "image_info": [{"image_name": n, "matched_text_index": j} for j, n in enumerate(names)],
            }
        )

    def records(names: list[str], split: str) -> list[dict]:
        return [
            {
                "id": f"{split}-{n}-{qtype}",
                "image": n,
                "question_type": qtype,
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": scenes[n].answer(qtype)},
                ],
            }
            for n in names
            for qtype in QUESTIONS
        ]

    paths = fewshot_files(out)
    paths["interleaved"].write_text("".join(json.dumps(d) + "\n" for d in docs))
    paths["support"].write_text(json.dumps(records(rng.sample(train, min(n_support, len(train))), "support"), indent=1))
    paths["fewshot_test"].write_text(json.dumps(records(test, "fewshot"), indent=1))
    return {k: str(v) for k, v in paths.items()}
