"""Labelled multimodal records for the classifier, and the embedded image + sound task.

A record is `{"id": ..., "<modality key>": path, ..., "labels": {task: class}}`. A record may lack a modality
(the model then predicts from the others) or a task's label (that task's loss skips it). Everything is loaded and
preprocessed once, up front, into tensors: the data are small and the encoders run every step.

The embedded task (`write_fusion_dataset`): a shapes image and a tone. Five labels:
- colour (from the image alone), pitch (from the sound alone), and
- mix = (colour group + pitch) mod 3, where colour group = the colour's index mod 3. Given either input alone,
  each mix class is equally likely, so a model that does not fuse the two stays at chance (1/3);
- total (a number to regress): shapes in the image + beeps in the sound, 2 to 6. Either input alone explains
  half its variance (R² 0.5);
- pair (a key to retrieve by): colour and pitch, e.g. "red high". Matches share both.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import track

from mmalign.data.processor import read_records
from mmalign.fusion.tasks import TaskSpec, as_number
from mmalign.modalities import get_modality
from mmalign.modalities.base import MediaError

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
PITCHES = ["low", "middle", "high"]
MIX = ["a", "b", "c"]
NUMBERS = {"one": 1, "two": 2, "three": 3}
# The kind of each embedded label (model.tasks.<t>.kind).
EMBEDDED_KINDS = {"colour": "classify", "pitch": "classify", "mix": "classify", "total": "regress", "pair": "retrieve"}


def mix_label(colour: str, pitch: str) -> str:
    return MIX[(COLOURS.index(colour) % 3 + PITCHES.index(pitch)) % 3]


def write_fusion_dataset(out: str | Path, n_train: int = 2000, n_test: int = 300, seed: int = 0,
                         progress: bool = True) -> dict[str, Path]:  # fmt: skip
    """Write image/*.png, audio/*.wav, train.jsonl and test.jsonl under `out`."""
    out = Path(out)
    image, audio = get_modality("image").synthetic, get_modality("audio").synthetic
    for sub in ("image", "audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        rng = random.Random(split_seed)
        rows = []
        for i in track(range(n), description=f"fusion {split}", disable=not progress):
            img, img_ans = image.make(rng)
            snd, snd_ans = audio.make(rng)
            name = f"{split}-{i:05d}"
            image.save(img, out / "image" / f"{name}{image.suffix}")
            audio.save(snd, out / "audio" / f"{name}{audio.suffix}")
            colour, pitch = img_ans["color"], snd_ans["pitch"]
            labels = {
                "colour": colour,
                "pitch": pitch,
                "mix": mix_label(colour, pitch),
                "total": NUMBERS[img_ans["count"]] + NUMBERS[snd_ans["beeps"]],
                "pair": f"{colour} {pitch}",
            }
            rows.append({"id": name, "image": f"image/{name}{image.suffix}", "audio": f"audio/{name}{audio.suffix}",
                         "labels": labels})  # fmt: skip
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@dataclass
class Labelled:
    """Preprocessed records: media[m] (N, ...), present[m] (N,) bool, labels[t] (N,) as `TaskSpec.encode` gives
    them (a class index, a number or a match key's index; -1 or NaN when missing)."""

    ids: list[str]
    media: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    errors: list[dict]

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index: torch.Tensor) -> dict:
        return {
            "index": index,
            "media": {m: x[index] for m, x in self.media.items()},
            "present": {m: p[index] for m, p in self.present.items()},
            "labels": {t: y[index] for t, y in self.labels.items()},
        }


def task_specs(path: str | Path, kinds: dict[str, str] | None = None,
               temperatures: dict[str, float] | None = None) -> dict[str, TaskSpec]:  # fmt: skip
    """Every task in a file's labels, with what its head needs from the training data: the sorted classes
    (classify) or the targets' mean and std (regress). `kinds` maps tasks to kinds; the rest classify."""
    kinds, temperatures = kinds or {}, temperatures or {}
    values: dict[str, list] = {}
    for rec in read_records(path):
        for task, value in (rec.get("labels") or {}).items():
            if value is not None:
                values.setdefault(task, []).append(value)
    if not values:
        raise ValueError(f'{path}: no record has `labels`; expected e.g. {{"labels": {{"mood": "happy"}}}}')
    specs = {}
    for task, seen in sorted(values.items()):
        spec = TaskSpec(kind=kinds.get(task, "classify"), temperature=temperatures.get(task, TaskSpec.temperature))
        if spec.kind == "classify":
            spec.classes = sorted({str(v) for v in seen})
        elif spec.kind == "regress":
            numbers = torch.tensor([n for n in map(as_number, seen) if n is not None], dtype=torch.float64)
            if len(numbers) == 0:
                raise ValueError(f"{path}: task {task} is kind=regress, but none of its labels is a number "
                                 f"(e.g. {seen[0]!r})")  # fmt: skip
            spec.mean = float(numbers.mean())
            spec.std = float(numbers.std()) if len(numbers) > 1 and numbers.std() > 0 else 1.0
        specs[task] = spec
    return specs


def load_labelled(path: str | Path, encoders: dict, specs: dict[str, TaskSpec], folder: str | Path = "",
                  progress: bool = True) -> Labelled:  # fmt: skip
    """Load and preprocess every record for `encoders` (modality -> encoder). A record that cannot be used (a
    file that does not load, a label its task cannot take, no modality at all) is left out and reported in
    `errors` with its id and the problem."""
    path = Path(path)
    folder = Path(folder) if folder else path.parent
    modalities = {m: get_modality(m) for m in sorted(encoders)}
    ids, items, flags, errors = [], {m: [] for m in modalities}, {m: [] for m in modalities}, []
    ys, keys = {t: [] for t in specs}, {t: {} for t in specs}
    shape: dict[str, tuple] = {}
    records = read_records(path)
    for index, rec in enumerate(track(records, description=f"loading {path.name}", disable=not progress)):
        sid = rec.get("id", index)
        try:
            row, row_flags = {}, {}
            for m, spec in modalities.items():
                source = rec.get(spec.record_key)
                if source is None:
                    row[m], row_flags[m] = None, False
                    continue
                if isinstance(source, list):
                    if len(source) != 1:
                        raise MediaError(f"{spec.record_key}: one item per record, got {len(source)}")
                    source = source[0]
                x = spec.preprocess(spec.load(spec.resolve(source, folder)), encoders[m])
                if shape.setdefault(m, tuple(x.shape)) != tuple(x.shape):
                    raise MediaError(f"{m} preprocessed to {tuple(x.shape)}, others to {shape[m]}")
                row[m], row_flags[m] = x, True
            if not any(row_flags.values()):
                wanted = [s.record_key for s in modalities.values()]
                raise MediaError(f"no media for any of {list(modalities)} (keys {wanted})")
            labels = rec.get("labels") or {}
            y = {}
            for task, task_spec in specs.items():
                try:
                    y[task] = task_spec.encode(labels.get(task), keys[task])
                except ValueError as err:
                    raise MediaError(f"label {task}={labels.get(task)!r}: {err}") from err
        except (MediaError, OSError, ValueError) as err:
            errors.append({"id": str(sid), "error": f"sample {sid}: {err}"})
            continue
        ids.append(str(sid))
        for m in modalities:
            items[m].append(row[m])
            flags[m].append(row_flags[m])
        for task in specs:
            ys[task].append(y[task])
    media = {}
    for m in modalities:
        if m not in shape:
            raise ValueError(f"{path}: no record has a {m} item; the model's encoders are {list(modalities)}")
        blank = torch.zeros(shape[m])
        media[m] = torch.stack([blank if x is None else x for x in items[m]]) if ids else torch.zeros(0, *shape[m])
    return Labelled(
        ids=ids,
        media=media,
        present={m: torch.tensor(flags[m], dtype=torch.bool) for m in modalities},
        labels={t: torch.tensor(ys[t], dtype=spec.dtype()) for t, spec in specs.items()},
        errors=errors,
    )
