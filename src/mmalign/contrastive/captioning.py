"""Captioning pretraining of an image tower (CapPa, Tschannen et al. 2023): a small text decoder cross-attends to
the tower's tokens and writes each image's caption.

Why it exists beside LiT: a contrastive loss only sees a pooled embedding, so nothing asks any single token to stay
about its own patch, and the tiny tower learns tokens that each carry the whole scene. A decoder that must write
"a red three and a blue seven" (left first) has to find the left digit's tokens and then the right digit's, so the
tokens it reads, exactly the layer the LLaVA connector reads, learn to say what they show and where.

CapPa's "parallel prediction" (§3: a share of the captions written with every decoder input masked, so the
decoder cannot lean on the caption's own prefix) is an option, off by default: it predicts each word from its
position alone, and captions that open with templates of different lengths move every word. On the glyphs data
(whose templates `caption_frames` does not find) the decoder at a 0.75 share never learned the digits
(teacher-forced digit words at about chance after 600 steps); plain captioning at half the learning rate did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from mmalign.constants import IGNORE_INDEX
from mmalign.contrastive.augment import Augment
from mmalign.contrastive.keys import caption_frames, caption_keys
from mmalign.data.pairs import read_pairs, split_off
from mmalign.models.encoders import clip_encoder, save_encoder
from mmalign.train.trainer import SampledObjective, Trainer, batch_generator, run_settings


class Captioner(nn.Module):
    """An image tower and a GPT-2 decoder (transformers, with cross-attention) that captions its tokens.
    The decoder's vocabulary is the data tokenizer's plus one mask token for parallel prediction."""

    def __init__(self, encoder: nn.Module, tokenizer, *, width: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 64):  # fmt: skip
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.encoder = encoder
        self.mask_id = len(tokenizer)
        config = GPT2Config(
            vocab_size=self.mask_id + 1, n_positions=max_length, n_embd=width, n_layer=layers, n_head=heads,
            add_cross_attention=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        self.decoder = GPT2LMHeadModel(config)
        self.project = nn.Linear(encoder.hidden_size, width)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token cross-entropy of writing `labels` (IGNORE_INDEX where padded) after `input_ids`."""
        memory = self.project(self.encoder(pixels))
        mask = torch.ones_like(input_ids)  # padding only ever follows the caption, and attention is causal
        logits = self.decoder(input_ids=input_ids, attention_mask=mask, encoder_hidden_states=memory).logits
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )


def encode_captions(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (N, max_length): bos, the caption, eos, then padding (IGNORE_INDEX in labels)."""
    ids = torch.full((len(texts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, text in enumerate(texts):
        row = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        row = row[:max_length]
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


class CaptioningObjective(SampledObjective):
    """Caption loss over sampled (image, caption) rows, summed over caption tokens; a `parallel` share of the rows
    in a batch see only mask tokens as decoder input (the bos stays, so the first prediction is conditioned alike)."""

    name = "caption"

    def __init__(self, model: Captioner, pixels, input_ids, labels, *, parallel: float, augment: Augment | None):
        super().__init__({"pixels": pixels, "input_ids": input_ids, "labels": labels})
        self.model, self.parallel, self.augment = model, parallel, augment

    def batches(self, state, cfg, log):
        for batch in super().batches(state, cfg, log):
            generator = batch_generator(cfg.seed + 1, state["cursor"])  # a function of the batch number: resumable
            batch["parallel"] = torch.rand(len(batch["index"]), generator=generator) < self.parallel
            if self.augment is not None:
                self.augment.generator = generator
                batch["pixels"] = self.augment(batch["pixels"])
            yield batch

    def counts(self, batch: dict) -> dict[str, int]:
        return {self.name: int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        length = int(batch["labels"].ne(IGNORE_INDEX).sum(1).max())  # no step on the batch's shared padding
        ids, labels = batch["input_ids"][:, :length].clone(), batch["labels"][:, :length]
        ids[batch["parallel"].to(ids.device), 1:] = self.model.mask_id
        return {self.name: self.model(batch["pixels"], ids, labels)}


@torch.no_grad()
def held_out_loss(model: Captioner, pixels, input_ids, labels, batch_size: int = 256) -> float:
    """Mean token loss of teacher-forced captions on held-out images."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pixels), batch_size):
        total += model(pixels[i : i + batch_size], input_ids[i : i + batch_size], labels[i : i + batch_size]).item()
        count += int(labels[i : i + batch_size, 1:].ne(IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def train_captioner(
    data,
    image_folder: str | Path,
    tokenizer,
    out_dir: str | Path,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 1e-3,
    parallel: float = 0.0,
    crop_scale: tuple[float, float] = (0.85, 1.0),
    max_length: int = 64,
    preset: str = "tiny-vit",
    seed: int = 0,
    overrides: list[str] = (),
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Train a tiny image tower from scratch by captioning the caption-like records of `data` (LLaVA-format files,
    one pair per record: its first image and first reply), 5% held out. Saves the tower to out_dir/image_encoder
    (the folder the LLaVA recipes load) and returns its figures: the held-out caption loss (teacher-forced, per
    token) given each image, and given a blank image instead, whose gap is what the tokens tell."""
    console = console or Console()
    torch.manual_seed(seed)
    out = Path(out_dir)
    encoder = clip_encoder(preset=preset)
    pairs = read_pairs(data, image_folder, encoder)
    if pairs.skipped:
        console.print(f"[yellow]skipped {len(pairs.skipped)} unreadable records[/], e.g. {pairs.skipped[0]}")
    pairs, held = split_off(pairs, seed)
    # Templates ("an image of") are dropped, as for LiT: under parallel prediction a caption's words are predicted
    # by position, and a template of variable length would move every word.
    frames = caption_frames(pairs.texts)
    ids, labels = encode_captions(tokenizer, caption_keys(pairs.texts, frames), max_length)
    held_ids, held_labels = encode_captions(tokenizer, caption_keys(held.texts, frames), max_length)
    model = Captioner(encoder, tokenizer, max_length=max_length)
    objective = CaptioningObjective(
        model, pairs.media, ids, labels, parallel=parallel,
        augment=Augment(seed=seed, crop_scale=crop_scale, flip=False, jitter=0.05, noise=0.02),
    )  # fmt: skip
    settings = run_settings(out, overrides, lr=lr, max_steps=steps, batch_size=batch_size, warmup_ratio=0.05,
                            weight_decay=0.05, clip_grad=1.0, seed=seed, progress=progress, log_every=10)  # fmt: skip
    summary = Trainer(objective, settings, console=console, resume=resume).fit()
    objective.cpu()
    seen = held_out_loss(model, held.media, held_ids, held_labels)
    blank = held_out_loss(model, torch.zeros_like(held.media), held_ids, held_labels)
    save_encoder(encoder, out / "image_encoder")
    return {
        "pairs": len(pairs.ids),
        "caption_frames": frames,
        "first_loss": summary["first_losses"].get(objective.name),
        "last_loss": summary["loss"],
        "held_out_loss": seen,
        "blank_image_loss": blank,
        "image_encoder": str(out / "image_encoder"),
    }
