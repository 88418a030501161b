"""Fusion modules: per-modality feature vectors in, one representation out.

Every module has one contract, whatever the number of modalities: `forward(features, mask) -> (B, dim)` where
`features` maps a modality name to (B, D_m) and `mask` maps it to a (B,) bool tensor, True where the sample has
that modality. A modality absent from `features` (or masked off) still gives a prediction: each module says below
what it uses in its place. Modalities are always visited in sorted order, so the output does not depend on the
order of the dict.
"""

from __future__ import annotations

import torch
from torch import nn

from mmalign.registry import Registry

FUSIONS = Registry("fusion")


class Fusion(nn.Module):
    """Base: resolves missing modalities into zeros plus a mask, in sorted order."""

    def __init__(self, dims: dict[str, int], dim: int):
        super().__init__()
        if not dims:
            raise ValueError("a fusion module needs at least one modality")
        self.modalities = sorted(dims)
        self.dims, self.dim = dict(dims), dim

    def inputs(self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None):
        """[(B, D_m)] with masked-off rows zeroed, and the (B, M) bool presence matrix."""
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise KeyError(f"features for {unknown}, but this fusion module was built for {self.modalities}")
        ref = next(iter(features.values()))
        batch = ref.shape[0]
        xs, present = [], []
        for m in self.modalities:
            x = features.get(m)
            if x is None:
                x = ref.new_zeros(batch, self.dims[m])
                keep = torch.zeros(batch, dtype=torch.bool, device=ref.device)
            else:
                if x.shape != (batch, self.dims[m]):
                    raise ValueError(f"{m} features have shape {tuple(x.shape)}, expected ({batch}, {self.dims[m]})")
                keep = torch.ones(batch, dtype=torch.bool, device=ref.device)
                if mask is not None and m in mask:
                    keep = mask[m].to(ref.device).bool()
                x = x * keep.unsqueeze(-1).to(x.dtype)
            xs.append(x)
            present.append(keep)
        return xs, torch.stack(present, dim=1)


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Concatenate (missing: zeros), append the presence flags so zeros and absence differ, project."""

    def __init__(self, dims: dict[str, int], dim: int):
        super().__init__(dims, dim)
        self.proj = nn.Sequential(nn.Linear(sum(dims.values()) + len(dims), dim), nn.LayerNorm(dim))

    def forward(self, features, mask=None):
        xs, present = self.inputs(features, mask)
        return self.proj(torch.cat([*xs, present.to(xs[0].dtype)], dim=-1))


@FUSIONS.register("attention")
class AttentionFusion(Fusion):
    """A small transformer over one token per modality plus a learned summary token, whose output is the result.
    Every modality attends to every other (cross-modal attention); missing ones are masked out of the keys."""

    def __init__(self, dims: dict[str, int], dim: int, depth: int = 2, heads: int = 4):
        super().__init__(dims, dim)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.kind = nn.Parameter(torch.randn(len(dims), dim) * 0.02)  # which modality a token came from
        self.summary = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features, mask=None):
        xs, present = self.inputs(features, mask)
        tokens = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs, strict=True)], dim=1)
        tokens = torch.cat([self.summary.expand(len(tokens), -1, -1), tokens + self.kind], dim=1)
        ignore = torch.cat([present.new_zeros(len(tokens), 1), ~present], dim=1)  # the summary is always there
        return self.norm(self.blocks(tokens, src_key_padding_mask=ignore)[:, 0])


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al. 2017) for any number of modalities: h_m = tanh(W_m x_m), and a gate
    computed from all inputs picks, per output unit, how much of each h_m to take (a softmax over modalities;
    with two modalities this is the GMU's z and 1 - z). Missing modalities get no share of the gate."""

    def __init__(self, dims: dict[str, int], dim: int):
        super().__init__(dims, dim)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.gate = nn.Linear(sum(dims.values()) + len(dims), len(dims) * dim)

    def forward(self, features, mask=None):
        xs, present = self.inputs(features, mask)
        h = torch.stack([torch.tanh(self.proj[m](x)) for m, x in zip(self.modalities, xs, strict=True)], dim=1)
        logits = self.gate(torch.cat([*xs, present.to(xs[0].dtype)], dim=-1)).view(len(h), len(xs), self.dim)
        logits = logits.masked_fill(~present.unsqueeze(-1), float("-inf"))
        # A sample with no modality at all would get NaN from softmax over all -inf; give it zeros instead.
        weights = torch.nan_to_num(logits.float().softmax(dim=1), nan=0.0).to(h.dtype)
        return (weights * h).sum(dim=1)


@FUSIONS.register("product")
class ProductFusion(Fusion):
    """Element-wise product of per-modality projections (1 + W_m x_m), so every output unit multiplies evidence
    from all modalities; a missing modality contributes the factor 1, which leaves the product unchanged."""

    def __init__(self, dims: dict[str, int], dim: int):
        super().__init__(dims, dim)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.norm = nn.LayerNorm(dim)

    def forward(self, features, mask=None):
        xs, present = self.inputs(features, mask)
        out = None
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            factor = 1 + self.proj[m](x) * present[:, i : i + 1].to(x.dtype)
            out = factor if out is None else out * factor
        return self.norm(out)


@FUSIONS.register("bilinear")
class LowRankBilinearFusion(Fusion):
    """Low-rank multimodal fusion (Liu et al. 2018): the tensor-fusion product of [x_m; 1] over all modalities,
    contracted with a weight tensor factorised into `rank` modality-specific factors, so the cost is linear in
    the number of modalities. A missing modality is [0; 1]: only its bias row speaks, as in tensor fusion."""

    def __init__(self, dims: dict[str, int], dim: int, rank: int = 8):
        super().__init__(dims, dim)
        self.rank = rank
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(rank, d + 1, dim) * (d + 1) ** -0.5) for m, d in dims.items()}
        )
        self.mix = nn.Parameter(torch.full((1, rank), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features, mask=None):
        xs, _ = self.inputs(features, mask)
        out = None
        for m, x in zip(self.modalities, xs, strict=True):
            z = torch.cat([x, x.new_ones(len(x), 1)], dim=-1)
            part = torch.einsum("bd,rdo->rbo", z, self.factors[m].to(z.dtype))  # (rank, B, dim)
            out = part if out is None else out * part
        return self.norm(torch.einsum("xr,rbo->bo", self.mix.to(out.dtype), out) + self.bias)


@FUSIONS.register("tensor")
class TensorFusion(Fusion):
    """Tensor fusion (Zadeh et al. 2017): project each modality to `rank` units, append 1, take the outer product
    over modalities (unimodal, bimodal, ... terms all appear), flatten, project. Size grows as (rank + 1)^M, so
    keep `rank` small beyond three modalities. A missing modality is [0; 1]."""

    def __init__(self, dims: dict[str, int], dim: int, rank: int = 8):
        super().__init__(dims, dim)
        self.proj = nn.ModuleDict({m: nn.Linear(d, rank) for m, d in dims.items()})
        self.out = nn.Sequential(nn.Linear((rank + 1) ** len(dims), dim), nn.LayerNorm(dim))

    def forward(self, features, mask=None):
        xs, present = self.inputs(features, mask)
        outer = None
        for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
            h = self.proj[m](x) * present[:, i : i + 1].to(x.dtype)
            z = torch.cat([h, h.new_ones(len(h), 1)], dim=-1)
            outer = z if outer is None else (outer.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)
        return self.out(outer)


def build_fusion(name: str, dims: dict[str, int], dim: int, **settings) -> Fusion:
    return FUSIONS.build(name, dims=dims, dim=dim, **settings)
