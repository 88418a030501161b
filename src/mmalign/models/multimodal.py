"""The projector family: encoder(s) -> connector -> LLM, media entering by early fusion (token splicing).

Input ids already carry one placeholder id per media feature (the processor expands `<image>`, `<audio>`, ...),
so the model checks the count per modality and scatters projected features into those positions, as
transformers' Llava does for images.

Every family offers the same surface to the rest of mmalign: `param_groups()` (what freezing, learning-rate
groups, the trainable table and checkpoints read), `forward(...)` for training, and `prefill` / `step` for
generation, so no caller reaches into the decoder itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.constants import IGNORE_INDEX
from mmalign.models.head_loss import head_cross_entropy


class MediaCountError(ValueError):
    """Placeholder positions and media features disagree; the message names the samples."""


@dataclass
class DecodeState:
    """What generation carries between steps: the KV cache, the attention mask and each row's position.

    With a static cache (`prefill(..., max_new_tokens=n)`) the mask is preallocated for the whole generation,
    (B, T + n), its columns from `length` on still 0; `step` sets one column instead of growing it. With a dynamic
    cache the mask is exactly the `length` columns seen so far and `step` appends one."""

    cache: object
    mask: torch.Tensor  # (B, T + n) 1 for real tokens, 0 for left padding and for columns not yet generated
    position: torch.Tensor  # (B,) position id of each row's last token
    length: int  # mask columns (tokens) the cache holds so far
    static: bool = False  # the cache and mask are preallocated: they cannot grow past mask.shape[1]
    extra: dict = field(default_factory=dict)  # the family's own decoder arguments (deep fusion: the media latents)


class MultimodalLM(nn.Module):
    family = "projector"
    _head_columns = None  # ((weight's storage, version), (D, V) copy of the LM head) for decode_logits

    def __init__(
        self,
        *,
        encoders: dict[str, nn.Module],
        connectors: dict[str, nn.Module],
        llm: nn.Module,
        media_token_ids: dict[str, int],
    ):
        super().__init__()
        if set(encoders) != set(connectors) or set(encoders) != set(media_token_ids):
            raise ValueError(
                f"encoders {sorted(encoders)}, connectors {sorted(connectors)} and placeholder ids "
                f"{sorted(media_token_ids)} must name the same modalities"
            )
        self.encoders = nn.ModuleDict(encoders)
        self.connectors = nn.ModuleDict(connectors)
        self.llm = llm
        self.media_token_ids = dict(media_token_ids)

    # ---------------------------------------------------------------- declared structure
    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def param_groups(self) -> dict[str, nn.Module]:
        """Named parameter groups, the one declaration that freezing, optimizer groups, the trainable table and
        checkpoint saving read. A group name selects every group it is a dotted prefix of (`encoder` selects
        `encoder.image` and `encoder.audio`)."""
        groups: dict[str, nn.Module] = {f"encoder.{m}": e for m, e in self.encoders.items()}
        groups |= {f"connector.{m}": c for m, c in self.connectors.items()}
        groups["llm"] = self.llm
        return groups

    def tokens_per_item(self, modality: str) -> int:
        """Placeholder ids one media item expands to: the single number both the processor and the model use."""
        return self.encoders[modality].num_tokens

    @property
    def decoder(self) -> nn.Module:
        """The LLM without its head (also through PEFT): takes inputs_embeds, returns hidden states."""
        return self.llm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ---------------------------------------------------------------- media
    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(items, ...) -> (items, tokens, llm_dim). A frozen encoder runs without autograd."""
        encoder, connector = self.encoders[modality], self.connectors[modality]
        x = x.to(next(connector.parameters()).dtype)
        if any(p.requires_grad for p in encoder.parameters()):
            feats = encoder(x)
        else:
            with torch.no_grad():
                feats = encoder(x)
        return connector(feats)

    def check_media(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor], sample_ids: list | None) -> None:
        """Each modality's placeholder positions must match its items x tokens per item; the error names samples."""
        unknown = set(media) - set(self.encoders)
        if unknown:
            raise MediaCountError(f"this model has no encoder for {sorted(unknown)}; it reads {self.modalities}")
        for modality, token_id in self.media_token_ids.items():
            is_media = input_ids == token_id  # (B, T)
            items = media.get(modality)
            n_items = 0 if items is None else items.shape[0]
            per_item = self.tokens_per_item(modality)
            n_positions = int(is_media.sum())
            if n_positions != n_items * per_item:
                per_sample = is_media.sum(1).tolist()
                names = sample_ids or list(range(len(per_sample)))
                detail = ", ".join(f"{n}: {c} {modality} tokens" for n, c in zip(names, per_sample, strict=True))
                raise MediaCountError(
                    f"{n_positions} {modality}-token positions but {n_items} {modality} items x {per_item} tokens = "
                    f"{n_items * per_item} features ({detail})"
                )

    def embed(
        self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None, sample_ids: list | None = None
    ) -> torch.Tensor:
        """Token embeddings with each modality's features scattered into its placeholder positions: (B, T, D)."""
        media = media or {}
        self.check_media(input_ids, media, sample_ids)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        for modality, token_id in self.media_token_ids.items():
            if media.get(modality) is not None and len(media[modality]):
                feats = self.encode(modality, media[modality]).to(embeds.dtype)  # (items, tokens, D)
                is_media = (input_ids == token_id).unsqueeze(-1)  # (B, T, 1)
                embeds = embeds.masked_scatter(is_media, feats.reshape(-1, feats.shape[-1]))
        return embeds

    # ---------------------------------------------------------------- what a family changes
    def decoder_inputs(
        self, input_ids: torch.Tensor, media: dict | None, sample_ids: list | None = None, generating: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """(inputs_embeds (B, T, D), extra decoder arguments). Early fusion needs no extra arguments."""
        return self.embed(input_ids, media, sample_ids), {}

    def step_inputs(self, state: DecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Embeddings (B, 1, D) of one new token per row, and the extra decoder arguments for that step."""
        return self.llm.get_input_embeddings()(tokens[:, None]), state.extra

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V)."""
        return self.lm_head(hidden)

    def decode_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits while generating, (B, D) -> (B, V): `logits` with the same result. On CPU, for a few
        rows, a product with a contiguous (D, V) matrix runs about 1.6x faster than nn.Linear's (V, D) one, and the
        LM head is half of a decode step; so a transposed copy is kept, made anew whenever the weight changes."""
        head = self.lm_head
        if hidden.device.type != "cpu" or type(head) is not nn.Linear:
            return self.logits(hidden)
        key = (head.weight.data_ptr(), head.weight._version)  # an optimizer step or a load bumps the version
        if self._head_columns is None or self._head_columns[0] != key:
            self._head_columns = (key, head.weight.detach().t().contiguous())
        out = hidden @ self._head_columns[1]
        return out if head.bias is None else out + head.bias

    # ---------------------------------------------------------------- training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: list | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict:
        """Without labels: {"logits": (B, T, V)}. With labels: {"loss_sum", "n_tokens"}.

        In training the LM head runs only at positions whose next token is supervised, so the (B, T, V) logits of
        media and prompt positions are never built. Packed rows (several samples per row) come with `position_ids`
        that restart at 0 for each sample and no `attention_mask`: the decoder then keeps the samples apart.
        """
        embeds, extra = self.decoder_inputs(input_ids, media, sample_ids)
        if position_ids is not None:
            extra = extra | {"position_ids": position_ids}
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **extra)
        hidden = out.last_hidden_state
        if labels is None:
            return {"logits": self.logits(hidden)}
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX  # (B, T - 1)
        picked = hidden[:, :-1][keep]  # (n_tokens, D)
        return {"loss_sum": self.head_loss(picked, targets[keep]), "n_tokens": int(keep.sum())}

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the LM head's logits at `hidden` (N, D) against `targets` (N,). A plain linear
        head goes through `head_cross_entropy`, which never holds the (N, V) logits; any other head (wrapped by
        PEFT, quantised) through its own forward."""
        head = self.lm_head
        if type(head) is not nn.Linear:
            return F.cross_entropy(self.logits(hidden).float(), targets, reduction="sum")
        return head_cross_entropy(hidden, head.weight, targets, head.bias, rows=self.replaced_rows())

    def replaced_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(ids, rows, their bias) of output rows the family uses in place of the head's own; None here."""
        return None

    # ---------------------------------------------------------------- generation
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: dict[str, torch.Tensor] | None = None,
        max_new_tokens: int = 0,
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run left-padded prompts (B, T) once: the next-token logits (B, V) and the state to continue from.

        With `max_new_tokens` > 0 the KV cache and the attention mask are preallocated for T + max_new_tokens
        tokens (a `StaticCache`), so each `step` writes in place instead of concatenating; `step` can then run at
        most `max_new_tokens` times. With 0 the cache grows as it goes (a `DynamicCache`), without limit."""
        from transformers import DynamicCache, StaticCache

        embeds, extra = self.decoder_inputs(input_ids, media, generating=True)  # (B, T, D)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        batch, length = attention_mask.shape
        if max_new_tokens > 0:
            cache = StaticCache(config=self.llm.config, max_cache_len=length + max_new_tokens)
            # The cache attends over all T + max_new_tokens slots from the start: the mask keeps the unwritten ones
            # out (transformers' causal mask does too; the zeros make it explicit and leave nothing to pad).
            mask = attention_mask.new_zeros((batch, length + max_new_tokens))  # (B, T + max_new_tokens)
            mask[:, :length] = attention_mask
        else:
            cache, mask = DynamicCache(config=self.llm.config), attention_mask
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **extra
        )
        logits = self.decode_logits(out.last_hidden_state[:, -1])  # only the last position is needed
        state = DecodeState(
            cache=cache, mask=mask, position=positions[:, -1], length=length, static=max_new_tokens > 0, extra=extra
        )
        return logits, state

    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) to the state in place; returns the next-token logits (B, V)."""
        if state.static:
            if state.length == state.mask.shape[1]:
                raise ValueError(
                    f"the decode state is full: prefill sized it for {state.length} tokens in all (prompt + "
                    "max_new_tokens); pass prefill a larger max_new_tokens"
                )
            state.mask[:, state.length] = 1  # (B,) column of the new token, written in place
        else:
            state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)  # (B, length + 1)
        state.length += 1
        state.position = state.position + 1
        embeds, extra = self.step_inputs(state, tokens)  # (B, 1, D)
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=state.mask,
            position_ids=state.position[:, None],  # (B, 1)
            cache=state.cache,
            use_cache=True,
            **extra,
        )
        return self.decode_logits(out.last_hidden_state[:, -1])
