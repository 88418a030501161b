"""What the onellm family's tokenizers hand the UPM, stage by stage: linear probes on the universal encoder's mean
token, per modality and question type, on the embedded multimodal data.

    mmalign quickstart --family onellm                      # writes runs/quickstart_onellm and data/multimodal
    python benchmarks/probe_onellm.py runs/quickstart_onellm/curriculum/*/ [--modalities video audio]

For each checkpoint (a curriculum stage's folder), each modality's items go through that checkpoint's own tokenizer
and the frozen universal encoder, exactly as `model.features` feeds the UPM, and are averaged over tokens. A
logistic-regression probe per question type learns the answer from the training conversations' items and is scored
on the held-out questions' items. The first stage (image) trains no other tokenizer, so its row shows what stage
0's binding left; a falling figure in later rows means training through the LLM walked the tokenizer off it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mmalign.contrastive.data2vec import linear_probe
from mmalign.data.processor import read_records
from mmalign.modalities.base import get_modality
from mmalign.train.checkpoint import load_checkpoint


def labelled_items(path: Path, modality: str, questions: dict[str, list[str]]) -> dict[str, list[tuple[str, str]]]:
    """{question type: [(media path, answer)]} from a conversation file; a turn's type is found by its wording."""
    kind_of = {q.lower(): kind for kind, phrasings in questions.items() for q in phrasings}
    key = get_modality(modality).record_key
    out: dict[str, list[tuple[str, str]]] = {kind: [] for kind in questions}
    for record in read_records(path):
        turns = record["conversations"]
        for ask, answer in zip(turns[::2], turns[1::2], strict=False):
            kind = record.get("question_type") or kind_of.get(ask["value"].split("\n")[-1].strip().lower())
            if kind in out:
                out[kind].append((record[key], answer["value"].strip()))
    return out


@torch.no_grad()
def mean_features(model, modality: str, raws: list, batch_size: int = 128) -> torch.Tensor:
    spec = get_modality(modality)
    tokenizer = model.encoders[modality]
    x = torch.stack([spec.preprocess(raw, tokenizer) for raw in raws])
    return torch.cat([model.features(modality, x[i : i + batch_size]).mean(1) for i in range(0, len(x), batch_size)])


def label(checkpoint: Path) -> str:
    """A stage folder by its run and stage: qo/1-image (the run is the folder above `curriculum`)."""
    parts = checkpoint.resolve().parts
    run = parts[-3] if len(parts) >= 3 and parts[-2] == "curriculum" else checkpoint.resolve().parent.name
    return f"{run}/{checkpoint.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="curriculum stage folders, in order")
    parser.add_argument("--data", type=Path, default=Path("data/multimodal"))
    parser.add_argument("--modalities", nargs="*", default=["video", "audio", "point", "depth", "imu", "signal"])
    args = parser.parse_args()
    console = Console()
    console = console if console.width >= 140 else Console(width=140)  # a file or a narrow terminal
    scores: dict[str, dict[str, str]] = {}  # {"modality question": {checkpoint: accuracy}}
    # Every checkpoint probes the same items: read the labels and load the files once.
    items = {}
    for m in args.modalities:
        questions = get_modality(m).synthetic.questions
        train = labelled_items(args.data / f"{m}_conversations_train.json", m, questions)
        test = labelled_items(args.data / f"{m}_qa_test.json", m, questions)
        paths = sorted({p for pairs in (*train.values(), *test.values()) for p, _ in pairs})
        items[m] = train, test, paths, [get_modality(m).load(args.data / p) for p in paths]
    for checkpoint in args.checkpoints:
        model, _, _ = load_checkpoint(checkpoint)
        model.eval()
        for m, (train, test, paths, raws) in items.items():
            feats = dict(zip(paths, mean_features(model, m, raws), strict=True))
            for kind in train:
                answers = sorted({a for _, a in train[kind]})
                index = {a: i for i, a in enumerate(answers)}
                seen = [(p, a) for p, a in test[kind] if a in index]
                if not train[kind] or not seen:
                    continue
                torch.manual_seed(0)  # the probe's own start: repeats give the same figures
                acc = linear_probe(
                    torch.stack([feats[p] for p, _ in train[kind]]),
                    torch.tensor([index[a] for _, a in train[kind]]),
                    torch.stack([feats[p] for p, _ in seen]),
                    torch.tensor([index[a] for _, a in seen]),
                )
                scores.setdefault(f"{m} {kind}", {})[label(checkpoint)] = f"{acc:.0%}"
    table = Table(title="linear probe on the universal encoder's mean token, held-out accuracy")
    table.add_column("modality, question")
    for checkpoint in args.checkpoints:
        table.add_column(label(checkpoint), justify="right")
    for question, row in scores.items():
        table.add_row(question, *(row.get(label(c), "") for c in args.checkpoints))
    console.print(table)


if __name__ == "__main__":
    main()
