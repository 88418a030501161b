"""CLIP (symmetric InfoNCE) and SigLIP (pairwise sigmoid) losses with learnable temperature, optionally over the
global batch of all ranks.

Distributed convention (gather=True): each rank computes only its own B rows of the (N, N) logit matrix,
N = world * B, so memory is linear in the global batch. Each rank's loss is normalised so that the mean of the rank
losses equals the single-process loss on the global batch. Because the gather's backward sums over ranks, the
gradient autograd leaves on a rank's embeddings is ``world`` times the gradient of the global loss w.r.t. those rows;
DDP's averaging over ranks divides that ``world`` back out for the encoder parameters. The temperature/bias
gradients are per-rank partial gradients whose mean over ranks (what DDP computes) is the global gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.contrastive.distributed import gather_with_grad, rank_and_world


def _normalise(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Logits in at least float32: a 0-D float32 scale does not promote bf16 operands, and the softmax/log-sigmoid
    # over a large global batch is precision sensitive.
    return F.normalize(x.to(torch.promote_types(x.dtype, dtype)), dim=-1)


class ClipLoss(nn.Module):
    """CLIP loss (Radford et al. 2021, Fig. 3): mean of image->text and text->image cross entropy over cosine
    similarities times a learnable scale exp(logit_scale), initialised to 1/0.07 and clipped at 100 (Sec. 2.5)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, gather: bool = False) -> None:
        super().__init__()
        # Stored as a log so the optimiser moves it multiplicatively and the scale stays positive.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        self.gather = gather

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clip logit_scale to at most ln(max_scale); call after each optimiser step."""
        self.logit_scale.clamp_(max=self.max_log_scale)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor | None = None):
        """image_emb (B, D), text_emb (B, D), row i of each a matching pair -> scalar loss.

        `positives` (B, B) bool, symmetric with a true diagonal: the pairs that match, for batches that repeat a
        content (each row's target is then spread evenly over its matches, as in SupCon). With gather=True under a
        process group, the negatives are the N = world * B rows of all ranks and the loss is the mean over this
        rank's 2B rows (image->text and text->image), so the mean over ranks is the global loss.
        """
        img = _normalise(image_emb, self.logit_scale.dtype)
        txt = _normalise(text_emb, self.logit_scale.dtype)
        if positives is not None:
            if self.gather and rank_and_world()[1] > 1:
                raise ValueError("ClipLoss: positives are for a single process' batch, not a gathered one")
            targets = positives.to(img.dtype) / positives.sum(1, keepdim=True).to(img.dtype)
            logits = self.logit_scale.exp() * img @ txt.T
            return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        rank, world = rank_and_world() if self.gather else (0, 1)
        all_img = gather_with_grad(img) if world > 1 else img  # (N, D)
        all_txt = gather_with_grad(txt) if world > 1 else txt
        scale = self.logit_scale.exp()
        labels = rank * img.shape[0] + torch.arange(img.shape[0], device=img.device)  # global index of the pair
        logits_img = scale * img @ all_txt.T  # (B, N): local image rows of the global matrix
        logits_txt = scale * txt @ all_img.T  # (B, N): local text rows of its transpose
        return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP loss (Zhai et al. 2023, Alg. 1): -1/|B| sum_i sum_j log sigmoid(z_ij (exp(t') <x_i, y_j> + b)) with
    z_ij = 1 on matching pairs and -1 otherwise; t' = ln 10 and b = -10 at init (Sec. 3.2) so the many negatives
    do not dominate the first steps."""

    def __init__(self, init_log_scale: float = math.log(10.0), init_bias: float = -10.0, gather: bool = False) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.gather = gather

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """image_emb (B, D), text_emb (B, D), row i of each a matching pair -> scalar loss.

        With gather=True under a process group, this rank's B images are scored against the N = world * B texts of
        all ranks and the sum is divided by B, so the mean over ranks is the global loss (sum over N*N pairs / N).
        The paper's chunked ring exchange saves the (N, D) gather; the gather is simpler and costs O(N) memory.
        """
        img = _normalise(image_emb, self.logit_scale.dtype)
        txt = _normalise(text_emb, self.logit_scale.dtype)
        rank, world = rank_and_world() if self.gather else (0, 1)
        all_txt = gather_with_grad(txt) if world > 1 else txt  # (N, D)
        b = img.shape[0]
        logits = self.logit_scale.exp() * img @ all_txt.T + self.logit_bias  # (B, N)
        signs = -torch.ones_like(logits)
        rows = torch.arange(b, device=logits.device)
        signs[rows, rank * b + rows] = 1.0
        return -F.logsigmoid(signs * logits).sum() / b
