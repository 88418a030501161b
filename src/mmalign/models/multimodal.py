"""The multimodal model: encoder -> connector -> LLM, with media entering by early fusion (token splicing).

Input ids already carry one image-token id per image feature (the processor expands `<image>`), so the model only
checks the count and scatters projected features into those positions, as transformers' Llava does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class MediaCountError(ValueError):
    """Image-token positions and image features disagree; the message names the samples."""


class MultimodalLM(nn.Module):
    def __init__(self, *, encoder: nn.Module, connector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        if getattr(connector, "fusion", "early") != "early":
            raise NotImplementedError("deep-fusion connectors wrap decoder layers; use their own builder")

    # ---------------------------------------------------------------- parts of the LLM (also through PEFT)
    @property
    def decoder(self) -> nn.Module:
        """The LLM without its head: takes inputs_embeds, returns hidden states."""
        return self.llm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def encoder_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    # ---------------------------------------------------------------- media
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens, llm_dim)."""
        dtype = next(self.connector.parameters()).dtype
        if self.encoder_is_frozen():
            with torch.no_grad():
                feats = self.encoder(pixel_values.to(dtype))
        else:
            feats = self.encoder(pixel_values.to(dtype))
        return self.connector(feats)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, sample_ids: list | None = None
    ) -> torch.Tensor:
        """Token embeddings with image features scattered into the image-token positions: (B, T, D)."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        is_image = input_ids == self.image_token_id  # (B, T)
        n_positions = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.encoder.num_tokens
        if n_positions != n_images * per_image:
            per_sample = is_image.sum(1).tolist()
            names = sample_ids or list(range(len(per_sample)))
            detail = ", ".join(f"{n}: {c} image tokens" for n, c in zip(names, per_sample, strict=True))
            raise MediaCountError(
                f"{n_positions} image-token positions but {n_images} images x {per_image} tokens = "
                f"{n_images * per_image} features ({detail})"
            )
        if n_images == 0:
            return embeds
        feats = self.encode_images(pixel_values).to(embeds.dtype)  # (images, tokens, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: list | None = None,
    ) -> dict:
        """Without labels: {"logits": (B, T, V)}. With labels: {"loss_sum", "n_tokens"}.

        In training the LM head runs only at positions whose next token is supervised, so the (B, T, V) logits of
        image and prompt positions are never built.
        """
        embeds = self.embed(input_ids, pixel_values, sample_ids)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if labels is None:
            return {"logits": self.lm_head(hidden)}
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX  # (B, T - 1)
        picked = hidden[:, :-1][keep]  # (n_tokens, D)
        logits = self.lm_head(picked).float()  # (n_tokens, V)
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return {"loss_sum": loss_sum, "n_tokens": int(keep.sum())}
