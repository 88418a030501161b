"""The embedded multimodal data: for each modality with a synthetic generator, real files (PNG, GIF, WAV, PLY, CSV,
NPY) plus LLaVA-format captions, question-answer conversations and held-out questions, keyed by the modality's
record key (`{"video": "video/train_00001.gif", ...}`).

Layout under `out`: `<modality>/` media files, `<modality>_captions_train.json`, `<modality>_conversations_train.json`,
`<modality>_qa_test.json` (one question per type per held-out item, tagged `question_type`), and `tokenizer/` (a
word-level tokenizer over every file's text). Train and test items come from disjoint seeds.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rich.progress import Progress

from mmalign.data.shapes import corpus_texts
from mmalign.data.tokenizer import build_word_tokenizer
from mmalign.modalities import MODALITIES, get_modality

CAPTION_PROMPTS = ["describe it .", "what is this ?", "give a short caption ."]
SPLIT_SEEDS = {"train": 11, "test": 13}


def synthetic_modalities() -> list[str]:
    """Every registered modality that can generate embedded data, in registration order."""
    return [m for m in MODALITIES.names() if get_modality(m).synthetic is not None]


def modality_files(out: str | Path, modality: str) -> dict[str, Path]:
    out = Path(out)
    return {
        "captions": out / f"{modality}_captions_train.json",
        "conversations": out / f"{modality}_conversations_train.json",
        "test": out / f"{modality}_qa_test.json",
    }


def _records(modality: str, split: str, n: int, out: Path, seed: int, bar, task) -> tuple[list, list, list]:
    spec = get_modality(modality)
    synth = spec.synthetic
    rng = random.Random(seed * 7919 + SPLIT_SEEDS[split] + 1000 * MODALITIES.names().index(modality))
    marker = spec.placeholder
    captions, conversations, questions = [], [], []
    for i in range(n):
        raw, answers = synth.make(rng)
        name = f"{modality}/{split}_{i:05d}{synth.suffix}"
        synth.save(raw, out / name)
        media = {spec.record_key: name}
        if split == "train":
            prompt = f"{marker}\n{rng.choice(CAPTION_PROMPTS)}"
            captions.append(
                {
                    "id": f"{modality}-cap-{i}",
                    **media,
                    "conversations": [
                        {"from": "human", "value": prompt},
                        {"from": "gpt", "value": synth.caption(answers, rng)},
                    ],
                }
            )
            turns = []
            for j, qtype in enumerate(rng.sample(list(synth.questions), min(3, len(synth.questions)))):
                question = rng.choice(synth.questions[qtype])
                turns += [
                    {"from": "human", "value": (f"{marker}\n" if j == 0 else "") + question},
                    {"from": "gpt", "value": answers[qtype]},
                ]
            conversations.append({"id": f"{modality}-conv-{i}", **media, "conversations": turns})
        else:
            for qtype, phrasings in synth.questions.items():
                questions.append(
                    {
                        "id": f"{modality}-{split}-{i}-{qtype}",
                        **media,
                        "question_type": qtype,
                        "conversations": [
                            {"from": "human", "value": f"{marker}\n{rng.choice(phrasings)}"},
                            {"from": "gpt", "value": answers[qtype]},
                        ],
                    }
                )
        bar.advance(task)
    return captions, conversations, questions


def write_multimodal_dataset(
    out_dir: str | Path,
    modalities: list[str] | None = None,
    n_train: int = 2000,
    n_test: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write every modality's files and a tokenizer over all their text. Returns
    {"folder", "tokenizer", "modalities": {modality: {"captions", "conversations", "test"}}} as strings."""
    out = Path(out_dir)
    names = modalities or synthetic_modalities()
    for m in names:
        if get_modality(m).synthetic is None:
            known = ", ".join(synthetic_modalities())
            raise ValueError(f"the {m} modality has no synthetic generator; modalities with one: {known}")
    texts, files = [], {}
    with Progress(disable=not progress, transient=True) as bar:
        for m in names:
            (out / m).mkdir(parents=True, exist_ok=True)
            task = bar.add_task(f"writing {m}", total=n_train + n_test)
            captions, conversations, _ = _records(m, "train", n_train, out, seed, bar, task)
            _, _, questions = _records(m, "test", n_test, out, seed, bar, task)
            files[m] = modality_files(out, m)
            for key, records in (("captions", captions), ("conversations", conversations), ("test", questions)):
                files[m][key].write_text(json.dumps(records, indent=1))
                texts += corpus_texts(records)
    # Placeholders are the tokenizer's special tokens (added when a model reads the modality), not words.
    marks = re.compile("|".join(re.escape(get_modality(m).placeholder) for m in MODALITIES.names()))
    build_word_tokenizer([marks.sub(" ", t) for t in texts], out / "tokenizer")
    return {
        "folder": str(out),
        "tokenizer": str(out / "tokenizer"),
        "modalities": {m: {k: str(v) for k, v in f.items()} for m, f in files.items()},
    }
