"""Import an OpenFlamingo checkpoint (`checkpoint.pt`, its state-dict layout) into an mmalign checkpoint.

OpenFlamingo saves only what it trains: the Perceiver Resampler (`perceiver.*`), the gated cross-attention blocks
(under each wrapped decoder layer, `lang_encoder.<layers>.<i>.gated_cross_attn_layer.*`) and the LM's embedding
rows. The vision encoder (open_clip) and the LM come from their own releases, so the import takes a base model
config naming them (a CLIP folder and the Hugging Face LM), and reads the rest from the state dict:

- `to_kv` (keys and values fused) splits into our `to_k` and `to_v`;
- the blocks keep OpenFlamingo's layout: the layers that carry one tell placement and interval (OpenFlamingo puts
  them before layers n-1, 2n-1, ...), never rewritten to the paper's;
- the tokenizer gets `<|endofchunk|>`, `<image>` (and `<PAD>` without a pad token) in OpenFlamingo's order, so
  the saved embedding rows keep their ids.

Heads per block and per resampler layer cannot be read from the shapes; they come from the base config's
`model.flamingo` (whose defaults, 8 x 64, are OpenFlamingo's).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from mmalign.config import ModelConfig
from mmalign.constants import END_OF_CHUNK
from mmalign.models.builder import build_model
from mmalign.models.llm import load_llm
from mmalign.models.xattn import xattn_layer_indices
from mmalign.train.checkpoint import save_checkpoint

BLOCK_KEY = re.compile(r"^lang_encoder\.(?:.+\.(\d+)\.gated_cross_attn_layer|gated_cross_attn_layers\.(\d+))\.(.+)$")
# OpenFlamingo's `FeedForward` is Sequential(LayerNorm, Linear, GELU, Linear): the same indices as ours.
BLOCK_NAMES = {
    "attn.norm.": "norm.",
    "attn.to_q.": "to_q.",
    "attn.to_kv.": "to_kv.",
    "attn.to_out.": "to_out.",
    "ff.": "ff.",
}


def _placement(indices: list[int], n_layers: int) -> tuple[str, int]:
    """The (placement, interval) that puts blocks exactly before `indices` of `n_layers` decoder layers."""
    for every in range(1, n_layers + 1):
        for placement in ("last", "first"):
            if xattn_layer_indices(n_layers, every, placement) == indices:
                return placement, every
    raise ValueError(f"blocks before decoder layers {indices} of {n_layers}: not every n-th layer")


def read_blocks(state: dict) -> dict[int, dict]:
    """{decoder layer: that block's OpenFlamingo state} from either of the two names a block is saved under."""
    blocks: dict[int, dict] = {}
    for key, value in state.items():
        m = BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1) or m.group(2)), {})[m.group(3)] = value
    return blocks


def _split_kv(state: dict) -> dict:
    """Every fused `to_kv` tensor (Linear(media_dim, 2 * inner): keys first, then values) as `to_k` and `to_v`."""
    out = {}
    for key, value in state.items():
        if "to_kv." in key:
            out[key.replace("to_kv.", "to_k.")], out[key.replace("to_kv.", "to_v.")] = value.chunk(2, dim=0)
        else:
            out[key] = value
    return out


def _block_state(of: dict) -> dict:
    out = {}
    for key, value in of.items():
        if key in ("attn_gate", "ff_gate"):
            out[key] = value.reshape(1)
            continue
        prefix = next((p for p in BLOCK_NAMES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"unexpected OpenFlamingo cross-attention tensor {key!r}")
        out[BLOCK_NAMES[prefix] + key[len(prefix) :]] = value
    return _split_kv(out)


def _resampler_state(of: dict) -> dict:
    """`perceiver.*` (prefix removed) -> our PerceiverResampler's names."""
    return _split_kv({"frame_embeddings" if k == "frame_embs" else k: v for k, v in of.items()})


def import_openflamingo(checkpoint: str | Path, base: ModelConfig, out: str | Path) -> Path:
    """Write an mmalign checkpoint folder from an OpenFlamingo `checkpoint.pt` and a base model config (encoder
    and LM, with `llm.path` or `llm.config` and a tokenizer)."""
    from transformers import AutoTokenizer

    out = Path(out)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model_state_dict", state)  # a training checkpoint nests the weights
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    if "perceiver.media_time_embs" in state:
        raise ValueError("this checkpoint has per-image time embeddings (max_num_media); the flamingo family has none")
    perceiver = {k[len("perceiver.") :]: v for k, v in state.items() if k.startswith("perceiver.")}
    blocks = read_blocks(state)
    if not perceiver or not blocks:
        raise ValueError(
            f"{checkpoint}: not an OpenFlamingo state dict (found {len(perceiver)} perceiver.* and {len(blocks)} "
            "gated_cross_attn_layer tensors)"
        )

    # Tokenizer in OpenFlamingo's order, then the LM with the checkpoint's embedding rows.
    tokenizer = AutoTokenizer.from_pretrained(base.llm.tokenizer or base.llm.path)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [END_OF_CHUNK, "<image>"]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    llm = load_llm(base.llm, tokenizer)
    _load_lm_tensors(llm, state, checkpoint)
    llm_dir = out / "llm"
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    n_layers = llm.config.num_hidden_layers
    placement, every = _placement(sorted(blocks), n_layers)
    ff_inner, dim = perceiver["layers.0.1.1.weight"].shape
    flamingo = dataclasses.replace(
        base.flamingo,
        num_latents=perceiver["latents"].shape[0],
        resampler_depth=len({k.split(".")[1] for k in perceiver if k.startswith("layers.")}),
        max_frames=perceiver["frame_embs"].shape[0] if "frame_embs" in perceiver else 1,
        ff_mult=ff_inner // dim,
        cross_attn_every_n_layers=every,
        xattn_placement=placement,
    )
    cfg = dataclasses.replace(base, family="flamingo", flamingo=flamingo)
    cfg.llm = dataclasses.replace(base.llm, path=str(llm_dir), tokenizer=None, config={})
    model, tokenizer = build_model(cfg)
    model.connectors["image"].load_state_dict(_resampler_state(perceiver))
    for index, of in blocks.items():
        model.xattn[str(index)].load_state_dict(_block_state(of))
    save_checkpoint(out, model, tokenizer, cfg)
    return out


def _load_lm_tensors(llm: torch.nn.Module, state: dict, checkpoint) -> None:
    """Copy the checkpoint's LM tensors (the embedding rows; any layer it trained) into `llm`. A decoder layer
    is saved inside OpenFlamingo's wrapper as `<i>.decoder_layer.*`; the LM's own name drops that part."""
    own = llm.state_dict()
    unknown = []
    for key, value in state.items():
        if not key.startswith("lang_encoder.") or BLOCK_KEY.match(key):
            continue
        name = key[len("lang_encoder.") :].replace(".decoder_layer.", ".")
        if name not in own:
            unknown.append(key)
            continue
        if value.shape != own[name].shape:
            raise ValueError(
                f"{key} is {tuple(value.shape)} but the base LM with OpenFlamingo's tokens has "
                f"{tuple(own[name].shape)}: is the base the LM and tokenizer {checkpoint} was trained on?"
            )
        own[name].copy_(value)
    if unknown:
        raise KeyError(f"{len(unknown)} LM tensors of {checkpoint} match nothing in the base LM: {unknown[:5]}")
