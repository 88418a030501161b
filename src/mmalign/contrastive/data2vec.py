"""data2vec-style self-distillation (Baevski et al. 2022) for a ViT-style encoder, and a linear probe to judge it.

The student sees the input with a random subset of patch embeddings replaced by a learned mask token and regresses,
at the masked positions, the teacher's targets: the average of its top-K block outputs, each layer-normalised
(§3.3), on the unmasked input. The teacher is an exponential moving average of the student (§3.2) whose decay
rises linearly from `ema_start` to `ema_end`.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from mmalign.train.trainer import SampledObjective, Trainer, run_settings


def _blocks(encoder: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    body = encoder._body()
    return body, body.encoder.layers


class Data2Vec(nn.Module):
    """Wraps a `VisionEncoder`; `forward(pixels) -> loss`. Call `update_teacher(progress)` after each step."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        top_k: int = 3,
        mask_ratio: float = 0.6,
        ema_start: float = 0.999,
        ema_end: float = 0.9999,
        target_norm: str = "instance",
    ):
        super().__init__()
        if target_norm not in ("instance", "layer"):
            raise ValueError(f"target_norm must be instance or layer, got {target_norm!r}")
        self.target_norm = target_norm
        self.student = encoder
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self.top_k, self.mask_ratio = top_k, mask_ratio
        self.ema_start, self.ema_end = ema_start, ema_end
        dim = encoder.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, dim)  # regression head (§3.3)
        self.has_cls = encoder.has_cls

    def _run(self, encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """All block outputs (each (B, T, D)); masked patches are swapped for the mask token before the blocks."""
        body, blocks = _blocks(encoder)
        h = body.embeddings(x)  # (B, T, D), T = CLS + patches for CLIP; position embeddings already added
        if mask is not None:
            patches = h[:, 1:] if self.has_cls else h
            # The mask token gets its patch's position embedding, so the student knows where to predict.
            positions = body.embeddings.position_embedding.weight[-patches.shape[1] :]  # (patches, D)
            masked = (self.mask_token + positions).to(h.dtype)
            patches = torch.where(mask.unsqueeze(-1), masked.unsqueeze(0), patches)
            h = torch.cat([h[:, :1], patches], dim=1) if self.has_cls else patches
        if hasattr(body, "pre_layrnorm"):
            h = body.pre_layrnorm(h)
        outs = []
        for block in blocks:
            h = block(h, None)
            outs.append(h)
        return outs

    def _normalise(self, h: torch.Tensor) -> torch.Tensor:
        if self.target_norm == "layer":
            return F.layer_norm(h, h.shape[-1:])  # per token, over features
        # Per feature, over the tokens of each sample (data2vec's instance norm): a constant background cannot
        # dominate the targets, only what differs between positions does.
        return F.instance_norm(h.transpose(1, 2)).transpose(1, 2)

    def random_mask(self, batch: int, n_patches: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, patches) bool, exactly round(ratio * patches) True per row."""
        n_mask = max(1, round(self.mask_ratio * n_patches))
        scores = torch.rand(batch, n_patches, generator=generator).to(device)
        return scores.argsort(dim=1) < n_mask

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n_patches = (self.student.image_size // self.student.patch_size) ** 2
        mask = self.random_mask(pixels.shape[0], n_patches, pixels.device, generator)
        with torch.no_grad():
            layers = self._run(self.teacher, pixels, None)[-self.top_k :]
            target = sum(self._normalise(h) for h in layers) / len(layers)  # (B, T, D)
            if self.has_cls:
                target = target[:, 1:]
        pred = self.head(self._run(self.student, pixels, mask)[-1])
        if self.has_cls:
            pred = pred[:, 1:]
        return F.mse_loss(pred[mask], target[mask])

    @torch.no_grad()
    def update_teacher(self, progress: float) -> float:
        """EMA step with decay interpolated by training progress in [0, 1]; returns the decay used."""
        decay = self.ema_start + (self.ema_end - self.ema_start) * min(max(progress, 0.0), 1.0)
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s, 1 - decay)
        return decay


@torch.no_grad()
def pooled_features(encoder: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled encoder tokens: (N, 3, H, W) -> (N, D)."""
    encoder.eval()
    return torch.cat([encoder(pixels[i : i + batch_size]).mean(1) for i in range(0, len(pixels), batch_size)])


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, steps: int = 300
) -> float:
    """Held-out accuracy of a logistic-regression probe on frozen features (standardised with train statistics)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(probe(train_x), train_y).backward()
        opt.step()
    return probe(test_x).argmax(-1).eq(test_y).float().mean().item()


class Data2VecObjective(SampledObjective):
    """Self-distillation on unlabelled inputs sampled with replacement; the EMA teacher moves after every step."""

    name = "data2vec"

    def __init__(self, model: Data2Vec, pixels: torch.Tensor):
        super().__init__({"pixels": pixels})
        self.model = model

    def draw(self, generator: torch.Generator) -> dict:
        return {"mask_seed": torch.randint(2**62, (1,), generator=generator)}  # which patches this batch masks

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(int(batch["mask_seed"]))
        return {self.name: self.model(batch["pixels"], generator=generator) * len(batch["index"])}

    def after_step(self, progress: float) -> None:
        self.model.update_teacher(progress)


def train_data2vec(
    encoder: nn.Module,
    pixels: torch.Tensor,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    out_dir: str | Path | None = None,
    overrides: list[str] = (),
    progress: bool = False,
    console: Console | None = None,
    **kwargs,
) -> list[float]:
    """Self-distil `encoder` in place on `pixels` (N, 3, H, W) with the Trainer; returns the loss curve."""
    torch.manual_seed(seed)
    objective = Data2VecObjective(Data2Vec(encoder, **kwargs), pixels)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="data2vec-"))
    settings = run_settings(out, overrides, lr=lr, max_steps=steps, batch_size=batch_size, warmup_ratio=0.1,
                            weight_decay=0.05, clip_grad=0.0, seed=seed, progress=progress, log_every=0)  # fmt: skip
    trainer = Trainer(objective, settings, console=console or Console(quiet=not progress))
    trainer.fit()
    objective.cpu()
    return trainer.history[objective.name]
