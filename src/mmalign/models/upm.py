"""OneLLM's Universal Projection Module (Han et al. 2023, §3.1): projection experts shared by every modality,
mixed per token by a modality's own router, read out at that modality's learned query tokens.

For one input of modality m with universal-encoder features f (N tokens):
    x = [queries_m ; LN(W_in f)]                      (Q + N tokens)
    w = router_m(x[:Q] + mean(x[Q:]))                 (Q, K) soft weights, each row sums to 1
    y = sum_k w[:, k] * expert_k(x)                   every expert runs on every token (a soft mixture)
    out = [start_m ; LN(W_out y[:Q]) ; end_m]         Q + 2 tokens of the LLM's width
so every modality enters the LLM as the same number of tokens between its own start and end tags. The router
reads each query plus the mean of the input's tokens (`route_on="tokens"`, the default), so the weights depend on
the input as the paper describes. OneLLM's released code routes the bare queries (`route_on="queries"`): there the
weights are the modality's own, the same for every input of it.
"""

from __future__ import annotations

import torch
from torch import nn

ROUTERS = ("softmax", "sigmoid")
ROUTE_ON = ("tokens", "queries")
QUERY_INIT = ("learned", "pooled")


class ModalityProjection(nn.Module):
    """What belongs to one modality: its input projection, queries, router, output projection and tags."""

    def __init__(self, dim: int, out_dim: int, num_queries: int, num_experts: int, router_hidden: int):
        super().__init__()
        self.proj_in = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.router = nn.Sequential(nn.Linear(dim, router_hidden), nn.GELU(), nn.Linear(router_hidden, num_experts))
        self.proj_out = nn.Sequential(nn.Linear(dim, out_dim), nn.LayerNorm(out_dim))
        self.start = nn.Parameter(torch.randn(out_dim) * 0.02)
        self.end = nn.Parameter(torch.randn(out_dim) * 0.02)


class UniversalProjection(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int,
        modalities: list[str],
        *,
        num_experts: int = 3,
        num_queries: int = 30,
        depth: int = 1,
        heads: int = 4,
        router_hidden: int = 0,
        router: str = "softmax",
        route_on: str = "tokens",
        queries: str = "learned",
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}: choose one of {', '.join(ROUTERS)}")
        if route_on not in ROUTE_ON:
            raise ValueError(f"route_on={route_on!r}: choose one of {', '.join(ROUTE_ON)}")
        if queries not in QUERY_INIT:
            raise ValueError(f"queries={queries!r}: choose one of {', '.join(QUERY_INIT)}")
        self.router_kind, self.route_on, self.query_init = router, route_on, queries
        self.num_queries = num_queries
        # Bidirectional pre-norm blocks (OneLLM's experts are LLaMA blocks without a causal mask).
        self.experts = nn.ModuleList(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True),
                depth,
                enable_nested_tensor=False,
            )
            for _ in range(num_experts)
        )
        hidden = router_hidden or 4 * dim
        self.modal = nn.ModuleDict(
            {m: ModalityProjection(dim, out_dim, num_queries, num_experts, hidden) for m in modalities}
        )

    @property
    def tokens_per_item(self) -> int:
        return self.num_queries + 2  # the queries between the start and end tags

    def _inputs(self, modality: str, feats: torch.Tensor) -> torch.Tensor:
        p = self.modal[modality]
        tokens = p.proj_in(feats)
        queries = p.queries.expand(len(feats), -1, -1).to(feats.dtype)
        if self.query_init == "pooled":
            # Query i starts from the mean of the i-th run of input tokens, so each query begins reading its own
            # stretch of the input instead of the whole of it.
            queries = queries + nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_queries).mT
        return torch.cat([queries, tokens], dim=1)  # (items, Q + N, dim)

    def route(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """The experts' input [queries; tokens] (items, Q + N, dim) -> (items, Q, experts) mixing weights, each row
        summing to 1. Only the queries are read out, so only they are routed."""
        queries = x[:, : self.num_queries]
        if self.route_on == "tokens":
            queries = queries + x[:, self.num_queries :].mean(1, keepdim=True)
        scores = self.modal[modality].router(queries)
        if self.router_kind == "softmax":
            return scores.softmax(-1)
        weights = scores.sigmoid()
        return weights / weights.sum(-1, keepdim=True)

    def router_weights(self, modality: str, feats: torch.Tensor) -> torch.Tensor:
        """The weights each query token gives each expert: (items, Q, experts), for inspection."""
        return self.route(modality, self._inputs(modality, feats))

    def forward(self, modality: str, feats: torch.Tensor) -> torch.Tensor:
        """Universal-encoder features (items, N, dim) -> LLM input tokens (items, Q + 2, out_dim)."""
        p, q = self.modal[modality], self.num_queries
        x = self._inputs(modality, feats)
        weights = self.route(modality, x)  # (items, Q, K)
        mixed = sum(weights[..., k : k + 1] * expert(x)[:, :q] for k, expert in enumerate(self.experts))
        out = p.proj_out(mixed)  # (items, Q, out_dim)
        tags = [t.expand(len(out), 1, -1).to(out.dtype) for t in (p.start, p.end)]
        return torch.cat([tags[0], out, tags[1]], dim=1)
