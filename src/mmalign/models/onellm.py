"""The onellm family (Han et al. 2023): per modality a lightweight tokenizer, one universal encoder shared by every
modality (an image tower, frozen by default), and the Universal Projection Module. Each input becomes the same
number of tokens, spliced into the LLM's embeddings as in the projector family, so everything downstream of
`encode` (placeholder checks, training, generation, evaluation) is the projector family's own."""

from __future__ import annotations

import torch
from torch import nn

from mmalign.models.multimodal import MultimodalLM
from mmalign.models.upm import UniversalProjection


class OneLLMLM(MultimodalLM):
    family = "onellm"

    def __init__(
        self,
        *,
        tokenizers: dict[str, nn.Module],
        universal: nn.Module,
        upm: UniversalProjection,
        llm: nn.Module,
        media_token_ids: dict[str, int],
    ):
        nn.Module.__init__(self)
        if set(tokenizers) != set(upm.modal) or set(tokenizers) != set(media_token_ids):
            raise ValueError(
                f"tokenizers {sorted(tokenizers)}, projections {sorted(upm.modal)} and placeholder ids "
                f"{sorted(media_token_ids)} must name the same modalities"
            )
        # `encoders` holds the tokenizers: they carry the preprocessing settings the processor reads.
        self.encoders = nn.ModuleDict(tokenizers)
        self.universal = universal
        self.upm = upm
        self.llm = llm
        self.media_token_ids = dict(media_token_ids)

    def param_groups(self) -> dict[str, nn.Module]:
        """`encoder` (the universal encoder), `tokenizer.<m>`, `connector.experts` (shared by every modality),
        `connector.<m>` (a modality's queries, router, projections and tags), `llm`."""
        groups: dict[str, nn.Module] = {"encoder": self.universal}
        groups |= {f"tokenizer.{m}": t for m, t in self.encoders.items()}
        groups["connector.experts"] = self.upm.experts
        groups |= {f"connector.{m}": p for m, p in self.upm.modal.items()}
        groups["llm"] = self.llm
        return groups

    def tokens_per_item(self, modality: str) -> int:
        return self.upm.tokens_per_item

    def features(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(items, ...) -> universal-encoder features (items, tokens, width). Without autograd when neither the
        tokenizer nor the encoder trains."""
        tokenizer = self.encoders[modality]
        x = x.to(next(self.upm.parameters()).dtype)
        trains = any(p.requires_grad for m in (tokenizer, self.universal) for p in m.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.universal.encode_tokens(tokenizer(x))

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(items, ...) -> (items, queries + 2, llm_dim)."""
        return self.upm(modality, self.features(modality, x))

    @torch.no_grad()
    def router_weights(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """How much each of the modality's query tokens draws on each expert: (items, queries, experts)."""
        return self.upm.router_weights(modality, self.features(modality, x))
