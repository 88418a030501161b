"""Few-shot in-context evaluation: k demonstrations (image, question, answer) before a query image and question.

Prompts are interleaved documents, `<image>{question} {answer}<|endofchunk|>` per demonstration and
`<image>{question}` for the query; the answer is generated up to the next `<|endofchunk|>`. Demonstrations come
from a support file with the query's question type, chosen at random or by RICES (retrieval-based in-context
example selection: the support images most similar to the query's under the model's own encoder, the most
similar placed last). At 0 shots the Flamingo paper's protocol gives two text-only demonstrations (images
dropped), so the model sees the answer format; `zero_shot="none"` asks the bare query instead.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import torch
from rich.progress import Progress
from rich.table import Table
from torch import nn

from mmalign.constants import END_OF_CHUNK
from mmalign.data.dataset import collate_media
from mmalign.data.processor import Conversation, Processor, SampleError, parse_record, read_records
from mmalign.evaluate import vqa_score
from mmalign.generate import generate

SELECTIONS = ("random", "rices")
ZERO_SHOT = ("text-demos", "none")


def _qa(record: dict, index: int, placeholder: str) -> dict:
    conv = parse_record(record, index)
    if not conv.media.get("image"):
        raise SampleError(conv.id, "a few-shot example needs an image")
    question = next(m["content"] for m in conv.messages if m["role"] == "user").replace(placeholder, "").strip()
    answer = conv.messages[-1]["content"].strip()
    return {"id": conv.id, "image": conv.media["image"][0], "question": question, "answer": answer,
            "type": conv.meta.get("question_type")}  # fmt: skip


def _chunk(question: str, answer: str | None) -> str:
    text = f"{question} " if question else ""
    return text + (f"{answer}{END_OF_CHUNK}" if answer is not None else "")


def build_prompt(demos: list[dict], query: dict, placeholder: str, text_only: bool = False) -> Conversation:
    """The interleaved prompt for one query as a document Conversation (images in order, query last)."""
    image = "" if text_only else placeholder
    text = "".join(image + _chunk(d["question"], d["answer"]) for d in demos)
    text += placeholder + _chunk(query["question"], None).rstrip()
    images = ([] if text_only else [d["image"] for d in demos]) + [query["image"]]
    return Conversation(id=query["id"], media={"image": images}, messages=[{"role": "document", "content": text}])


def choose_demos(candidates: list[int], k: int, rng: random.Random, similarity: torch.Tensor | None = None):
    """k support indices: at random, or (given each candidate's similarity to the query) the k most similar in
    rising order, so the most similar demonstration sits right before the query."""
    if similarity is None:
        return rng.sample(candidates, k)
    return [candidates[j] for j in similarity.topk(k).indices.flip(0).tolist()]


@torch.no_grad()
def image_features(model: nn.Module, images: list[torch.Tensor], batch_size=64) -> torch.Tensor:
    """(N, D) unit-norm mean-pooled encoder features of preprocessed images: what RICES ranks by."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack(images[start : start + batch_size]).to(next(model.parameters()).device)
        feats = model.encoders["image"](pixels).mean(1)
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def evaluate_fewshot(
    model: nn.Module,
    processor: Processor,
    queries: str | Path,
    support: str | Path,
    folder: str | Path,
    *,
    shots: list[int] = (0, 2, 4, 8),
    select: str = "random",
    zero_shot: str = "text-demos",
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy per shot count: {"shots": {k: {"accuracy", "by_type", "n", "predictions"}}, "select", "zero_shot"}."""
    if select not in SELECTIONS:
        raise ValueError(f"select={select!r}: choose one of {', '.join(SELECTIONS)}")
    if zero_shot not in ZERO_SHOT:
        raise ValueError(f"zero_shot={zero_shot!r}: choose one of {', '.join(ZERO_SHOT)}")
    placeholder = processor.specs["image"].placeholder
    tok = processor.tokenizer
    query_set = [_qa(r, i, placeholder) for i, r in enumerate(read_records(queries)[:limit])]
    support_set = [_qa(r, i, placeholder) for i, r in enumerate(read_records(support))]
    pool: dict = defaultdict(list)  # question type -> support indices
    for i, s in enumerate(support_set):
        pool[s["type"]].append(i)
    for q in query_set:
        if len(pool[q["type"]]) < max(shots):
            raise ValueError(
                f"{len(pool[q['type']])} support examples of type {q['type']!r}; {max(shots)} shots need more"
            )
    spec = processor.specs["image"]
    pixels: dict[str, torch.Tensor] = {}  # support images, read once however many prompts show them
    for s in support_set:
        if s["image"] not in pixels:
            pixels[s["image"]] = spec.tensor(s["image"], s["id"], folder)
    support_pixels = [pixels[s["image"]] for s in support_set]

    def query_pixels(q: dict) -> torch.Tensor:
        return spec.tensor(q["image"], q["id"], folder)

    similarity = None
    if select == "rices":
        queries_seen = image_features(model, [query_pixels(q) for q in query_set])
        similarity = queries_seen @ image_features(model, support_pixels).T  # (queries, support)
    stop_ids = [tok.convert_tokens_to_ids(END_OF_CHUNK), tok.eos_token_id]
    model.eval()
    results = {}
    with Progress(disable=not progress, transient=True) as bar:
        for k in shots:
            rng = random.Random(seed * 1_000_003 + k)
            task = bar.add_task(f"{k}-shot", total=len(query_set))
            scores, by_type, predictions = [], defaultdict(list), []
            for start in range(0, len(query_set), batch_size):
                prompts, media, batch = [], [], query_set[start : start + batch_size]
                for qi, q in enumerate(batch, start):
                    candidates = pool[q["type"]]
                    if k == 0:
                        demos = rng.sample(candidates, 2) if zero_shot == "text-demos" else []
                    else:
                        sims = None if similarity is None else similarity[qi, candidates]
                        demos = choose_demos(candidates, k, rng, sims)
                    conv = build_prompt([support_set[d] for d in demos], q, placeholder, text_only=k == 0)
                    prompts.append(processor.prompt_ids(conv))
                    shown = [] if k == 0 else [support_pixels[d] for d in demos]  # as build_prompt placed them
                    media.append({"image": torch.stack([*shown, query_pixels(q)])})
                outs = generate(model, prompts, collate_media(media), pad_id=tok.pad_token_id, stop_ids=stop_ids,
                                max_new_tokens=max_new_tokens)  # fmt: skip
                for q, out in zip(batch, outs, strict=True):
                    said = tok.decode(out, skip_special_tokens=True).strip()
                    score = vqa_score(said, [q["answer"]])
                    scores.append(score)
                    predictions.append({"id": q["id"], "prediction": said, "answer": q["answer"], "score": score})
                    by_type[q["type"]].append(score)
                bar.advance(task, len(batch))
            results[k] = {
                "accuracy": sum(scores) / max(len(scores), 1),
                "n": len(scores),
                "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items(), key=lambda kv: str(kv[0]))},
                "predictions": predictions,
            }
    return {"shots": results, "select": select, "zero_shot": zero_shot}


def fewshot_table(res: dict, data: str | Path) -> Table:
    """evaluate_fewshot's result as a table: accuracy per shot count and question type, saying which 0-shot ran."""
    protocol = "two text-only demonstrations" if res["zero_shot"] == "text-demos" else "the bare query"
    table = Table(title=f"few-shot accuracy on {data} (demos: {res['select']}; 0-shot: {protocol})")
    types = sorted({t for r in res["shots"].values() for t in r["by_type"]}, key=str)
    for col in ("shots", "n", "accuracy", *map(str, types)):
        table.add_column(col, justify="right")
    for k, r in res["shots"].items():
        table.add_row(str(k), str(r["n"]), f"{r['accuracy']:.1%}", *(f"{r['by_type'].get(t, 0):.1%}" for t in types))
    return table
