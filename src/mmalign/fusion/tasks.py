"""What each task of the multimodal classifier predicts: its head size, label encoding, loss and held-out figures.

Three kinds, chosen per task with `model.tasks.<t>.kind`:
- classify: a class out of those seen in training; cross-entropy; accuracy.
- regress: a number; the head predicts the target standardised by the training targets' mean and std, with a
  squared-error loss; R² (the headline), MAE and RMSE in the label's own units.
- retrieve: an embedding; samples whose labels are equal are matches. Supervised contrastive loss (Khosla et al.
  2020) over the batch; recall@1, recall@5 and mean average precision with each held-out sample as a query
  against all the others. Labels are match keys, not classes: held-out keys need not occur in training.

Missing labels are -1 (classify, retrieve) or NaN (regress); a task's loss skips them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

KINDS = ("classify", "regress", "retrieve")
HEADLINE = {"classify": "accuracy", "regress": "r2", "retrieve": "recall@1"}
# How tables name each figure.
LABELS = {"accuracy": "acc", "r2": "R²", "mae": "MAE", "rmse": "RMSE", "recall@1": "R@1", "recall@5": "R@5",
          "map": "mAP"}  # fmt: skip


@dataclass
class TaskSpec:
    kind: str = "classify"
    classes: list[str] = field(default_factory=list)  # classify: the head's class order
    mean: float = 0.0  # regress: the training targets' mean and std
    std: float = 1.0
    temperature: float = 0.1  # retrieve: the contrastive loss's temperature

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; known: {', '.join(KINDS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def out_dim(self, dim: int) -> int:
        return {"classify": len(self.classes), "regress": 1, "retrieve": dim}[self.kind]

    # ------------------------------------------------------------------------------------------------ labels
    def encode(self, value, keys: dict[str, int]) -> float | int:
        """One record's label as stored in `Labelled.labels`; None (no label) gives the missing value. Retrieval
        keys get indices in order of first appearance in `keys`. Raises ValueError on a label the task cannot
        use."""
        if self.kind == "regress":
            if value is None:
                return math.nan
            number = as_number(value)
            if number is None:
                raise ValueError(f"expected a number, got {value!r}")
            return number
        if value is None:
            return -1
        if self.kind == "classify":
            if str(value) not in self.classes:
                raise ValueError(f"{value!r} is not one of the training classes {self.classes}")
            return self.classes.index(str(value))
        return keys.setdefault(str(value), len(keys))

    def dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "regress" else torch.long

    def seen(self, y: torch.Tensor) -> torch.Tensor:
        return ~torch.isnan(y) if self.kind == "regress" else y >= 0

    # -------------------------------------------------------------------------------------------------- loss
    def count(self, y: torch.Tensor) -> int:
        """The samples a batch's loss sum is over (retrieval: the anchors with at least one match)."""
        if self.kind != "retrieve":
            return int(self.seen(y).sum())
        return int(match_matrix(y[y >= 0]).any(dim=1).sum())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss summed over the batch's labelled samples."""
        out = out.float()
        if self.kind == "classify":
            return F.cross_entropy(out, y, ignore_index=-1, reduction="sum")
        if self.kind == "regress":
            seen = self.seen(y)
            target = (torch.nan_to_num(y) - self.mean) / self.std
            return torch.where(seen, out.squeeze(-1) - target, 0.0).pow(2).sum()
        return contrastive_sum(out[y >= 0], y[y >= 0], self.temperature)

    # ------------------------------------------------------------------------------------------------ scores
    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Class indices, numbers in the label's units, or unit-length embeddings."""
        if self.kind == "classify":
            return out.argmax(dim=-1)
        if self.kind == "regress":
            return out.squeeze(-1).float() * self.std + self.mean
        return F.normalize(out.float(), dim=-1)

    def scores(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Held-out figures from the predictions of every sample; {} when no sample is labelled."""
        seen = self.seen(y)
        pred, y = pred[seen], y[seen]
        if len(y) == 0:
            return {}
        if self.kind == "classify":
            return {"accuracy": float((pred == y).float().mean())}
        if self.kind == "regress":
            error = pred - y
            spread = ((y - y.mean()) ** 2).sum()
            r2 = 1 - float((error**2).sum() / spread) if spread > 0 else math.nan
            return {"r2": r2, "mae": float(error.abs().mean()), "rmse": float(error.pow(2).mean().sqrt())}
        return retrieval_scores(pred, y)


def as_number(value) -> float | None:
    """A JSON number or a numeric string as float; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def match_matrix(keys: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: j is a match of i (equal keys, j != i)."""
    same = keys[:, None] == keys[None, :]
    return same & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)


def contrastive_sum(embeddings: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss summed over anchors: each anchor's mean -log p(match) over its matches, p a
    softmax over every other sample of the batch. Anchors without a match add nothing."""
    z = F.normalize(embeddings, dim=-1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, -math.inf)
    log_p = (sim - sim.logsumexp(dim=1, keepdim=True)).masked_fill(eye, 0.0)
    matches = match_matrix(keys)
    # An anchor without a match sums nothing over nothing: 0 / 1. No boolean indexing, so no host sync.
    per_anchor = -(log_p * matches).sum(dim=1) / matches.sum(dim=1).clamp_min(1)
    return per_anchor.sum()


def retrieval_scores(embeddings: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    """Each sample queries all the others by cosine similarity; queries without a match are left out."""
    matches = match_matrix(keys)
    queries = matches.any(dim=1)
    if not queries.any():
        return {}
    sim = embeddings @ embeddings.T
    sim.fill_diagonal_(-math.inf)
    order = sim.argsort(dim=1, descending=True)[:, :-1]  # the last is the query itself
    hits = matches.gather(1, order)[queries].float()  # (Q, N-1): is the k-th nearest a match
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    precision_at_hit = hits.cumsum(dim=1) / ranks
    average_precision = (precision_at_hit * hits).sum(dim=1) / hits.sum(dim=1)
    return {
        "recall@1": float(hits[:, 0].mean()),
        "recall@5": float(hits[:, :5].amax(dim=1).mean()),
        "map": float(average_precision.mean()),
    }


def format_score(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric in ("r2", "mae", "rmse") else f"{value:.1%}"
