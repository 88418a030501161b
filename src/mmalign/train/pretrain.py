"""Stage 0 for the embedded default: give the tiny vision tower and the tiny LM their own pretraining.

Vision: supervised multi-task attribute prediction (colour, shape, size, count, side) from every token of the
layer the connector reads, so each token learns what is at its place. LM: next-token prediction on the text of
the training data (captions and conversations, placeholders removed).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import nn

from mmalign.config import LLMConfig
from mmalign.constants import IGNORE_INDEX
from mmalign.data.processor import parse_record, read_records
from mmalign.data.shapes import ATTRIBUTES, load_split
from mmalign.models.encoders import VisionEncoder, clip_encoder, save_encoder
from mmalign.models.llm import load_llm, load_tokenizer
from mmalign.train.optim import warmup_cosine

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


def _loop(params, steps: int, lr: float, loss_fn, label: str, console: Console, progress: bool) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.05))
    losses = []
    with Progress(console=console, disable=not progress) as bar:
        task = bar.add_task(label, total=steps)
        for step in range(steps):
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"{label} loss {loss.item():.3f}")
    return losses


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
    console = console or Console()
    torch.manual_seed(seed)
    data_dir = Path(data_dir)
    encoder: VisionEncoder = clip_encoder(preset=preset)

    def split(name: str):
        pixels, scenes = load_split(data_dir, name, encoder)
        return pixels, {a: torch.tensor([vals.index(s[a]) for s in scenes]) for a, vals in ATTRIBUTES.items()}

    pixels, targets = split("train")
    # Two sets of heads: one on the flattened tokens (what is where), one on their mean, which makes every token
    # carry the attributes (side included) in its content rather than only in its index.
    flat = encoder.num_tokens * encoder.hidden_size
    heads = nn.ModuleDict({f"{a}_flat": nn.Linear(flat, len(v)) for a, v in ATTRIBUTES.items()})
    heads.update({f"{a}_mean": nn.Linear(encoder.hidden_size, len(v)) for a, v in ATTRIBUTES.items()})
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(pixels), (batch_size,), generator=gen)
        tokens = encoder(pixels[idx])  # (B, tokens, D)
        views = {"flat": tokens.flatten(1), "mean": tokens.mean(1)}
        return sum(F.cross_entropy(heads[f"{a}_{v}"](x), targets[a][idx]) for a in ATTRIBUTES for v, x in views.items())

    params = list(encoder.parameters()) + list(heads.parameters())
    losses = _loop(params, steps, lr, loss_fn, "stage 0 vision", console, progress)
    save_encoder(encoder, out_dir)
    val_pixels, val_targets = split("val")
    with torch.no_grad():
        tokens = encoder(val_pixels).flatten(1)
        val_acc = {
            a: (heads[f"{a}_flat"](tokens).argmax(-1) == val_targets[a]).float().mean().item() for a in ATTRIBUTES
        }
    return {"out_dir": str(out_dir), "first_loss": losses[0], "last_loss": losses[-1], "val_accuracy": val_acc}


def lm_corpus(paths: list[str | Path], image_token: str = "<image>") -> list[list[dict]]:
    """Conversations as message lists, placeholders stripped: the text the LM pretrains on."""
    convs = []
    for path in paths:
        for rec in read_records(path):
            conv = parse_record(rec, len(convs))
            convs.append([{**m, "content": m["content"].replace(image_token, "").strip()} for m in conv.messages])
    return convs


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
    console = console or Console()
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(LLMConfig(tokenizer=str(tokenizer_dir)), ["<image>"])
    model = load_llm(LLMConfig(config=dict(llm_config or TINY_LLAMA)), tokenizer)
    convs = lm_corpus(texts_from)
    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, IGNORE_INDEX)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(rows), (batch_size,), generator=gen)
        return model(input_ids=ids[idx], attention_mask=(labels[idx] != IGNORE_INDEX).long(), labels=labels[idx]).loss

    losses = _loop(list(model.parameters()), steps, lr, loss_fn, "stage 0 LM", console, progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "out_dir": str(out_dir),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "perplexity": math.exp(losses[-1]),
    }
