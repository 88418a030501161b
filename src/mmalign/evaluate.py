"""VQA evaluation: batched greedy answers, the standard VQA answer normalisation, accuracy per question type."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from mmalign.data.dataset import collate_media
from mmalign.data.processor import Processor, SampleError, parse_record, read_records
from mmalign.generate import generate

# The official VQA evaluation's normalisation (Antol et al. 2015; vqaEval.py): punctuation, digits, articles,
# contractions. A subset of its contraction table covers the forms short answers use.
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't", "wont": "won't",
    "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't", "didnt": "didn't",
    "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "im": "i'm", "ive": "i've",
    "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's", "its": "it's", "lets": "let's",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: list[str]) -> float:
    """min(1, matching human answers / 3) for VQAv2-style answer lists; exact match for a single answer."""
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return float(matches >= 1) if len(answers) == 1 else min(1.0, matches / 3)


def evaluate_vqa(
    model: nn.Module,
    processor: Processor,
    data: str | Path,
    media_folder: str | Path,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    blind: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Greedy answers to the last user turn of each sample; scores against the last assistant turn (or `answers`).

    `blind=True` replaces every media item (of every modality) with zeros: the same model, no media information.
    Returns {"accuracy", "by_type": {type: (accuracy, n)}, "predictions": [...], "skipped": [...]}.
    """
    records = read_records(data)[:limit]
    tok = processor.tokenizer
    stop_ids = [tok.eos_token_id]
    predictions, skipped = [], []
    model.eval()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("eval (blind)" if blind else "eval", total=len(records))
        for start in range(0, len(records), batch_size):
            prompts, media, items = [], [], []
            for index in range(start, min(start + batch_size, len(records))):
                rec = records[index]
                try:
                    conv = parse_record(rec, index)
                    ids = processor.prompt_ids(conv)
                    sample_media = processor.media(conv, media_folder)
                except SampleError as err:
                    skipped.append(str(err))
                    continue
                answers = rec.get("answers") or [conv.messages[-1]["content"]]
                prompts.append(ids)
                items.append((conv, answers))
                media.append({m: torch.zeros_like(x) if blind else x for m, x in sample_media.items()})
            if prompts:
                outs = generate(
                    model,
                    prompts,
                    collate_media(media),
                    pad_id=tok.pad_token_id,
                    stop_ids=stop_ids,
                    max_new_tokens=max_new_tokens,
                )
                for (conv, answers), out in zip(items, outs, strict=True):
                    pred = tok.decode(out, skip_special_tokens=True).strip()
                    qtype = conv.meta.get("question_type")
                    predictions.append(
                        {
                            "id": conv.id,
                            "type": qtype,
                            "prediction": pred,
                            "answers": answers,
                            "score": vqa_score(pred, answers),
                        }
                    )
            bar.update(task, completed=min(start + batch_size, len(records)))
    by_type: dict[str, list[float]] = defaultdict(list)
    for p in predictions:
        if p["type"] is not None:  # untyped samples count only in the overall accuracy
            by_type[p["type"]].append(p["score"])
    scores = [p["score"] for p in predictions]
    return {
        "accuracy": sum(scores) / max(len(scores), 1),
        "n": len(scores),
        "by_type": {t: (sum(v) / len(v), len(v)) for t, v in sorted(by_type.items())},
        "predictions": predictions,
        "skipped": skipped,
    }


def majority_baseline(data: str | Path) -> dict:
    """The accuracy of always giving a question type's most common answer: {"by_type": {type: accuracy}, "all":
    over every sample (untyped samples get the most common answer among untyped ones)}."""
    counts: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for rec in read_records(data):
        counts[rec.get("question_type")][normalize_answer(rec["conversations"][-1]["value"])] += 1
    total = sum(sum(c.values()) for c in counts.values())
    return {
        "by_type": {t: max(c.values()) / sum(c.values()) for t, c in sorted(counts.items()) if t is not None},
        "all": sum(max(c.values()) for c in counts.values()) / max(total, 1),
    }
