"""GATED XATTN-DENSE (Flamingo, Fig. 4) and how it enters any Hugging Face decoder without touching its code.

A block adds `tanh(alpha_xattn) * CrossAttention(text -> media latents)` and then `tanh(alpha_dense) * FFW` to
the hidden states, in front of a decoder layer. Both alphas start at 0, so a fresh model is exactly its LM.

The blocks are not spliced into the LM: a forward pre-hook on each chosen decoder layer runs the block on the
layer's input. The LM keeps its class, its modules and its state-dict keys (HF `save_pretrained`, PEFT and
`from_pretrained` see a plain LM), and the media travel as an explicit keyword argument of the decoder call,
which transformers' decoders hand on to every layer; the hook takes it out before the layer runs. Nothing is
stored on a module between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.models.resampler import feed_forward

CONTEXT_KEY = "media_context"


@dataclass
class MediaContext:
    """What every cross-attention block needs for one decoder call.

    `media` holds each row's media latents in order of appearance, zero-padded to the longest row; `media_time`
    says, per token, how many media items precede it (its own placeholder included), so 0 means "no media yet".
    `kv` caches each block's keys and values of the media across decoding steps (None: do not cache)."""

    media: torch.Tensor | None  # (B, M, L, D) or None when no row has media
    media_time: torch.Tensor  # (B, T) long
    only_immediate: bool = True
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)


def media_mask(media_time: torch.Tensor, n_media: int, only_immediate: bool) -> torch.Tensor:
    """(B, T) media times -> (B, T, M) bool: may token t attend to media item m (1-based m + 1)?

    Immediate (the Flamingo default): only the last item before the token. Otherwise: every item before it.
    A token before the first item may attend to none."""
    slots = torch.arange(1, n_media + 1, device=media_time.device)  # (M,)
    t = media_time.unsqueeze(-1)  # (B, T, 1)
    return (slots == t) if only_immediate else (slots <= t)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the Llama feed-forward, which IDEFICS uses in its blocks."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class GatedCrossAttentionBlock(nn.Module):
    """Text hidden states (B, T, dim) attend to media latents (B, M, L, media_dim) through two tanh gates.

    The defaults are the paper's block (LayerNorm, GELU MLP, scalar gates). IDEFICS's differs only in options:
    RMSNorm, a SwiGLU feed-forward of the LM's width, per-head query/key norms and per-unit gates."""

    def __init__(
        self,
        *,
        dim: int,
        media_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        activation: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        ff: str = "mlp",
        ff_dim: int = 0,
        qk_norm: bool = False,
        gate: str = "scalar",
    ):
        super().__init__()
        if norm not in NORMS or ff not in ("mlp", "swiglu") or gate not in ("scalar", "vector"):
            raise ValueError(f"cross-attention block: unknown norm {norm!r}, feed-forward {ff!r} or gate {gate!r}")
        inner = heads * dim_head
        self.heads = heads
        self.norm = NORMS[norm](dim, eps=norm_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(media_dim, inner, bias=False)
        self.to_v = nn.Linear(media_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = NORMS[norm](dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = NORMS[norm](dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        ff_norm = NORMS[norm](dim, eps=norm_eps)
        if ff == "swiglu":
            self.ff = nn.Sequential(ff_norm, SwiGLU(dim, ff_dim or ff_mult * dim))
        else:
            self.ff = feed_forward(dim, ff_mult, activation, norm=ff_norm, inner=ff_dim)
        gate_shape = (dim,) if gate == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, N, h * dh) -> (B, h, N, dh)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, L, media_dim) -> keys, values (B, h, M * L, dh)."""
        flat = media.flatten(1, 2)
        return self.k_norm(self._split(self.to_k(flat))), self._split(self.to_v(flat))

    def attend(self, x: torch.Tensor, ctx: MediaContext, index: int) -> torch.Tensor:
        """Cross-attention output (B, T, dim); zero at tokens that may attend to no media item."""
        if ctx.kv is not None and index in ctx.kv:
            k, v = ctx.kv[index]
        else:
            k, v = self.media_kv(ctx.media.to(x.dtype))
            if ctx.kv is not None:
                ctx.kv[index] = (k, v)
        n_media, n_latents = ctx.media.shape[1], ctx.media.shape[2]
        allowed = media_mask(ctx.media_time, n_media, ctx.only_immediate)  # (B, T, M)
        sees_any = allowed.any(-1, keepdim=True)  # (B, T, 1)
        # A row with nothing to attend to would be all -inf (NaN after softmax): let it attend anywhere, then zero it.
        mask = (allowed | ~sees_any).repeat_interleave(n_latents, dim=-1)  # (B, T, M * L)
        q = self.q_norm(self._split(self.to_q(self.norm(x))))  # (B, h, T, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, h, T, dh)
        return self.to_out(out.transpose(1, 2).flatten(2)) * sees_any.to(x.dtype)

    def forward(self, x: torch.Tensor, ctx: MediaContext, index: int = 0) -> torch.Tensor:
        if ctx.media is not None:
            x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attend(x, ctx, index)
        return x + torch.tanh(self.ff_gate).to(x.dtype) * self.ff(x)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers: its one direct child ModuleList as long as the config's layer count
    (`layers` in Llama and Qwen2, `h` in GPT-2, ...), found by shape rather than by class or attribute name."""
    n = decoder.config.num_hidden_layers
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise TypeError(
            f"cannot find the decoder layers of {type(decoder).__name__}: expected one child ModuleList of "
            f"{n} layers, found {len(lists)}"
        )
    return lists[0]


def xattn_layer_indices(n_layers: int, every: int, placement: str) -> list[int]:
    """Decoder layers that get a block in front: `first` puts one before layers 0, n, 2n, ... (the paper and
    IDEFICS), `last` before layers n-1, 2n-1, ... (OpenFlamingo's `cross_attn_every_n_layers`)."""
    if placement == "first":
        return [i for i in range(n_layers) if i % every == 0]
    if placement == "last":
        return [i for i in range(n_layers) if (i + 1) % every == 0]
    raise ValueError(f"xattn placement {placement!r}: choose first (paper, IDEFICS) or last (OpenFlamingo)")


def attach_blocks(decoder: nn.Module, blocks: dict[int, GatedCrossAttentionBlock]) -> list:
    """Register a pre-hook on each decoder layer that has a block; returns the hook handles."""
    layers = decoder_layers(decoder)
    handles = []
    for index, block in blocks.items():

        def before_layer(module, args, kwargs, block=block, index=index):
            ctx = kwargs.pop(CONTEXT_KEY, None)
            if ctx is None:
                raise RuntimeError(
                    f"decoder layer {index} has a cross-attention block but was called without `{CONTEXT_KEY}`; "
                    "call the model, not its LM"
                )
            if args:
                return (block(args[0], ctx, index), *args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], ctx, index)
            return args, kwargs

        handles.append(layers[index].register_forward_pre_hook(before_layer, with_kwargs=True))
    # Layers without a block get the context too (the decoder hands it to all): drop it before they see it.
    for index, layer in enumerate(layers):
        if index not in blocks:
            handles.append(layer.register_forward_pre_hook(_drop_context, with_kwargs=True))
    return handles


def _drop_context(module, args, kwargs):
    kwargs.pop(CONTEXT_KEY, None)
    return args, kwargs
