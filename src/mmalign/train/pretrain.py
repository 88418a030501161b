"""Stage 0: give the tiny vision tower and the tiny LM their own pretraining, as objectives of the Trainer.

Vision (embedded shapes data only): supervised multi-task attribute prediction (colour, shape, size, count, side)
from every token of the layer the connector reads, so each token learns what is at its place. LM (any data):
next-token prediction on the text of the training data (captions and conversations, placeholders removed).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from mmalign.config import LLMConfig, TrainConfig
from mmalign.constants import IGNORE_INDEX
from mmalign.data.processor import SampleError, parse_record, read_records
from mmalign.data.shapes import ATTRIBUTES, load_split
from mmalign.modalities.base import MODALITIES, get_modality
from mmalign.models.encoders import VisionEncoder, clip_encoder, save_encoder
from mmalign.models.llm import load_llm, load_tokenizer
from mmalign.train.trainer import SampledObjective, Trainer, run_settings

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def stage0_settings(out: Path, steps: int, batch_size: int, lr: float, seed: int, progress: bool) -> TrainConfig:
    return run_settings(out, lr=lr, max_steps=steps, batch_size=batch_size, warmup_ratio=0.05, weight_decay=0.01,
                        clip_grad=1.0, seed=seed, progress=progress, log_every=10)  # fmt: skip


class AttributeHeads(SampledObjective):
    """Cross-entropy of one head per attribute on the flattened tokens (what is where) and one on their mean, which
    makes every token carry the attributes (side included) in its content rather than only in its index."""

    def __init__(self, encoder: VisionEncoder, pixels: torch.Tensor, labels: dict[str, torch.Tensor]):
        super().__init__({"pixels": pixels} | {f"y_{a}": y for a, y in labels.items()})
        self.name = "heads"
        self.encoder, self.attributes = encoder, list(labels)
        flat = encoder.num_tokens * encoder.hidden_size
        classes = {a: int(y.max()) + 1 for a, y in labels.items()}
        self.heads = nn.ModuleDict({f"{a}_flat": nn.Linear(flat, c) for a, c in classes.items()})
        self.heads.update({f"{a}_mean": nn.Linear(encoder.hidden_size, c) for a, c in classes.items()})

    def counts(self, batch: dict) -> dict[str, int]:
        return {a: len(batch["index"]) for a in self.attributes}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = self.encoder(batch["pixels"])  # (B, tokens, D)
        views = {"flat": tokens.flatten(1), "mean": tokens.mean(1)}
        return {
            a: sum(
                F.cross_entropy(self.heads[f"{a}_{v}"](x), batch[f"y_{a}"], reduction="sum") for v, x in views.items()
            )
            for a in self.attributes
        }

    @torch.no_grad()
    def accuracy(self, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens = self.encoder(pixels).flatten(1)
        return {a: (self.heads[f"{a}_flat"](tokens).argmax(-1) == y).float().mean().item() for a, y in labels.items()}


def pretrain_vision(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 4e-3,
    preset: str = "tiny-vit",
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Train a tiny CLIP-architecture tower on the shapes attributes; save it where `encoder.path` can load it."""
    torch.manual_seed(seed)
    data_dir, out = Path(data_dir), Path(out_dir)
    encoder: VisionEncoder = clip_encoder(preset=preset)

    def split(name: str):
        pixels, scenes = load_split(data_dir, name, encoder)
        return pixels, {a: torch.tensor([vals.index(s[a]) for s in scenes]) for a, vals in ATTRIBUTES.items()}

    objective = AttributeHeads(encoder, *split("train"))
    settings = stage0_settings(out / "run", steps, batch_size, lr, seed, progress)
    summary = Trainer(objective, settings, console=console).fit()
    objective.cpu().eval()
    save_encoder(encoder, out)
    return {
        "out_dir": str(out),
        "first_loss": sum(summary["first_losses"].values()),
        "last_loss": summary["loss"],
        "val_accuracy": objective.accuracy(*split("val")),
    }


def strip_placeholders(text: str) -> str:
    for name in MODALITIES.names():
        text = text.replace(get_modality(name).placeholder, "")
    return text.strip()


def lm_corpus(paths: list[str | Path]) -> list[list[dict]]:
    """Conversations as message lists, placeholders of every modality stripped: the text the LM pretrains on.
    Records that do not parse are left out (the recipes that read them report them)."""
    convs = []
    for path in paths:
        for index, rec in enumerate(read_records(path)):
            try:
                conv = parse_record(rec, index)
            except SampleError:
                continue
            if conv.is_document:
                continue  # interleaved documents are not chats; the LM pretrains on the conversations
            convs.append([{**m, "content": strip_placeholders(m["content"])} for m in conv.messages])
    return convs


class TextLM(SampledObjective):
    """Next-token loss summed over the non-pad tokens of chat-formatted conversations."""

    name = "lm"

    def __init__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
        super().__init__({"ids": ids, "labels": labels})
        self.model = model

    def counts(self, batch: dict) -> dict[str, int]:
        return {self.name: int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        logits = self.model(input_ids=batch["ids"], attention_mask=(labels != IGNORE_INDEX).long()).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return {self.name: loss}


def pretrain_lm(
    texts_from: list[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 3e-3,
    llm_config: dict | None = None,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Train a tiny Llama on the data's text with the chat template; save model + tokenizer as a HF folder."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    placeholders = [get_modality(name).placeholder for name in MODALITIES.names()]
    tokenizer = load_tokenizer(LLMConfig(tokenizer=str(tokenizer_dir)), placeholders)
    model = load_llm(LLMConfig(config=dict(llm_config or TINY_LLAMA)), tokenizer)
    convs = lm_corpus(texts_from)
    if not convs:
        raise ValueError(f"no readable conversations in {[str(p) for p in texts_from]}")
    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
    limit = model.config.max_position_embeddings
    length = min(limit, max(len(r) for r in rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        r = r[:length]
        ids[i, : len(r)] = torch.tensor(r)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, IGNORE_INDEX)
    objective = TextLM(model, ids, labels)
    settings = stage0_settings(out / "run", steps, batch_size, lr, seed, progress)
    summary = Trainer(objective, settings, console=console).fit()
    objective.cpu()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "out_dir": str(out),
        "first_loss": summary["first_losses"]["lm"],
        "last_loss": summary["loss"],
        "perplexity": math.exp(summary["loss"]),
    }
