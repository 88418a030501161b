"""Conversion to and from transformers' IdeficsForVisionText2Text (IDEFICS, the open Flamingo reproduction).

IDEFICS is a Flamingo whose parts are our Flamingo family's parts with some options set, so nothing here is a
second implementation; `idefics_options` names them:

- its Perceiver Resampler uses a ReLU feed-forward (4x), optional layer-normed queries/keys, no time embeddings;
- its cross-attention blocks use RMSNorm, the LM's SwiGLU feed-forward width, the LM's heads, optional per-head
  RMS query/key norms and scalar or per-unit gates, placed before layers 0, n, 2n, ... (the paper's placement);
- its vision tower is a CLIP ViT read at the last layer with the CLS token; its text model is a LLaMA-1 decoder,
  whose extra "decoupled" rows (ids past `vocab_size`) become ordinary rows of our LM, with our own trainable
  copies for `<image>` and `<|endofchunk|>`.

One difference stays outside the model: IDEFICS's processor also stops text after an end-of-sequence token from
seeing the previous image (packed documents); our documents are never packed, so the mask matches without it.

Weights move module by module with `load_state_dict`, so a renamed tensor in transformers raises instead of
being dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmalign.config import EncoderConfig, FlamingoConfig, LLMConfig, MediaConfig, ModelConfig
from mmalign.models.adapters import merged_copy
from mmalign.models.builder import build_model
from mmalign.models.encoders import VisionEncoder, read_image_norm
from mmalign.models.flamingo import FlamingoLM
from mmalign.models.llm import special_token_ids
from mmalign.models.resampler import PerceiverResampler
from mmalign.train.checkpoint import save_checkpoint


def idefics_options(text_config) -> dict:
    """The `model.flamingo` settings that make our blocks IDEFICS's for an LM with this (Llama or IDEFICS) config."""
    heads = text_config.num_attention_heads
    return dict(
        xattn_placement="first",
        media_attention="immediate",
        xattn_heads=heads,
        xattn_dim_head=text_config.hidden_size // heads,
        xattn_norm="rmsnorm",
        xattn_norm_eps=text_config.rms_norm_eps,
        xattn_ff="swiglu",
        xattn_ff_dim=text_config.intermediate_size,
        activation="relu",
        ff_mult=4,
        max_frames=1,
    )


TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
)
# CLIP vision config name -> IdeficsVisionConfig name
VISION_FIELDS = {
    "hidden_size": "embed_dim",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
}


def _shared_text(config) -> dict:
    """The settings a Llama config and an IDEFICS config share, read from either."""
    return {k: getattr(config, k) for k in TEXT_FIELDS} | {
        "rope_parameters": dict(config.rope_parameters),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


# ---------------------------------------------------------------------------------------------------- export
def _check_exportable(model: FlamingoLM, cfg: ModelConfig, llm: nn.Module) -> None:
    if getattr(model, "family", None) != "flamingo" or model.modalities != ["image"]:
        raise ValueError(
            f"hf-idefics export takes a flamingo-family model reading images only; this one is "
            f"{getattr(model, 'family', type(model).__name__)} reading {getattr(model, 'modalities', '?')}"
        )
    text = llm.config
    problems = []
    if text.model_type != "llama":
        problems.append(f"a Llama LM (this one is {text.model_type})")
    else:
        if text.num_key_value_heads != text.num_attention_heads:
            problems.append(
                f"as many key/value heads as heads ({text.num_key_value_heads} vs {text.num_attention_heads})"
            )
        if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
            problems.append("no attention or MLP biases")
        if getattr(text, "head_dim", None) not in (None, text.hidden_size // text.num_attention_heads):
            problems.append(f"head_dim = hidden_size / heads (this one has head_dim={text.head_dim})")
    if text.hidden_act != "silu":
        problems.append(f"a SiLU LM (IDEFICS's blocks reuse its activation; this one is {text.hidden_act})")
    for key, want in idefics_options(text).items():
        have = getattr(cfg.flamingo, key)
        if key == "xattn_ff_dim" and have == 0:
            have = cfg.flamingo.ff_mult * text.hidden_size
        if have != want:
            problems.append(f"model.flamingo.{key}={want!r} (this model has {have!r})")
    n_layers, every = text.num_hidden_layers, cfg.flamingo.cross_attn_every_n_layers
    if n_layers % every:
        problems.append(f"a layer count divisible by cross_attn_every_n_layers ({n_layers} % {every} != 0)")
    enc = model.encoders["image"]
    if not isinstance(enc, VisionEncoder) or enc.family != "clip":
        problems.append("a single CLIP vision tower")
    elif enc.num_blocks != enc.tower.config.num_hidden_layers or not enc.keep_cls:
        problems.append("the tower read at its last layer with the CLS token (encoder.feature_layer=-1, keep_cls=true)")
    if problems:
        raise ValueError("hf-idefics export needs " + "; ".join(problems))


def export_hf_idefics(model: FlamingoLM, tokenizer, model_cfg: ModelConfig, out: str | Path) -> Path:
    """Write `out` so that IdeficsForVisionText2Text.from_pretrained loads it (with the tokenizer and an
    IdeficsProcessor whose image processor preprocesses as we do)."""
    model = merged_copy(model)  # adapters folded into their base weights; the live model keeps them
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    llm = model.llm
    _check_exportable(model, model_cfg, llm)
    text, fl = llm.config, model_cfg.flamingo
    enc, resampler = model.encoders["image"], model.connectors["image"]
    vision = enc.tower.config
    embed = model.new_tokens.embedding_weight(llm.get_input_embeddings().weight).detach()  # (V, D)
    head = model.new_tokens.head_weight(llm.get_output_embeddings().weight).detach()
    # Rows past the tokenizer's base vocabulary (its added tokens) become IDEFICS's trainable "additional" rows.
    base = min(tokenizer.vocab_size, embed.shape[0])
    config = IdeficsConfig(
        vocab_size=base,
        additional_vocab_size=embed.shape[0] - base,
        **_shared_text(text),
        cross_layer_interval=fl.cross_attn_every_n_layers,
        qk_layer_norms=fl.xattn_qk_norm,
        alpha_type="vector" if fl.xattn_gate == "vector" else "float",
        use_resampler=True,
        vision_config={theirs: getattr(vision, ours) for ours, theirs in VISION_FIELDS.items()},
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=fl.num_latents,
            resampler_depth=fl.resampler_depth,
            resampler_n_heads=fl.resampler_heads,
            resampler_head_dim=fl.resampler_dim_head,
            qk_layer_norms_perceiver=fl.qk_norm,
        ),
        **special_token_ids(tokenizer),
    )
    hf = IdeficsForVisionText2Text(config).eval()
    inner = hf.model
    inner.vision_model.load_state_dict(enc.tower.state_dict())
    inner.perceiver_resampler.load_state_dict(_resampler_to_idefics(resampler))
    for theirs, ours in zip(inner.gated_cross_attn_layers, model.xattn.values(), strict=True):  # layer order
        theirs.load_state_dict(_block_to_idefics(ours, vector=fl.xattn_gate == "vector"))
    decoder = llm.get_decoder()
    inner.layers.load_state_dict(decoder.layers.state_dict())
    inner.norm.load_state_dict(decoder.norm.state_dict())
    _set_decoupled(inner.embed_tokens, embed, base)
    _set_decoupled(hf.lm_head, head, base)
    for key, value in special_token_ids(tokenizer).items():
        setattr(hf.generation_config, key, value)
    out = Path(out)
    hf.save_pretrained(out)
    image_processor = IdeficsImageProcessorPil(  # resize to a square, bicubic, then normalise: as we preprocess
        image_size=enc.image_size, image_mean=list(enc.mean), image_std=list(enc.std)
    )
    IdeficsProcessor(image_processor, tokenizer).save_pretrained(out)
    return out


def _set_decoupled(module: nn.Module, weight: torch.Tensor, base: int) -> None:
    """Fill an IDEFICS decoupled embedding or LM head (main rows + additional rows) from one (V, D) matrix."""
    with torch.no_grad():
        module.weight.copy_(weight[:base])
        if weight.shape[0] > base:
            _additional(module).weight.copy_(weight[base:])


def _additional(module: nn.Module) -> nn.Module | None:
    """The extra ("decoupled") rows of an IDEFICS embedding or LM head; None when it has none."""
    names = [n for n in ("additional_embedding", "additional_fc") if hasattr(module, n)]
    return getattr(module, names[0]) if names else None


def _resampler_to_idefics(resampler: PerceiverResampler) -> dict:
    """Our resampler's state dict under IDEFICS's perceiver names."""
    out = {
        "latents": resampler.latents,
        "layer_norm.weight": resampler.norm.weight,
        "layer_norm.bias": resampler.norm.bias,
    }
    for i, (attn, ff) in enumerate(resampler.layers):
        for ours, theirs in RESAMPLER_ATTENTION.items():
            for key, value in getattr(attn, ours).state_dict().items():
                out[f"blocks.{i}.0.{theirs}.{key}"] = value
        for ours, theirs in RESAMPLER_FF.items():
            for key, value in ff[ours].state_dict().items():
                out[f"blocks.{i}.1.{theirs}.{key}"] = value
    return out


def _block_to_idefics(block: nn.Module, vector: bool) -> dict:
    """Our cross-attention block's state dict under IdeficsGatedCrossAttentionLayer's names."""
    out = {}
    for ours, theirs in BLOCK.items():
        module = block.get_submodule(ours)
        for key, value in module.state_dict().items():
            out[f"{theirs}.{key}"] = value
    shape = (1, 1, -1) if vector else (1,)
    out["alpha_cross_attn"] = block.attn_gate.reshape(shape)
    out["alpha_dense"] = block.ff_gate.reshape(shape)
    return out


# ours -> IDEFICS, by submodule
RESAMPLER_ATTENTION = {
    "norm_media": "context_layer_norm",
    "norm_latents": "latents_layer_norm",
    "to_q": "q_proj",
    "to_k": "k_proj",
    "to_v": "v_proj",
    "to_out": "output_proj",
    "q_norm": "q_layer_norm",
    "k_norm": "k_layer_norm",
}
RESAMPLER_FF = {0: "ln", 1: "fc", 3: "c_proj"}
BLOCK = {
    "norm": "input_layernorm",
    "to_q": "cross_attn.q_proj",
    "to_k": "cross_attn.k_proj",
    "to_v": "cross_attn.v_proj",
    "to_out": "cross_attn.o_proj",
    "q_norm": "cross_attn.q_layer_norm",
    "k_norm": "cross_attn.k_layer_norm",
    "ff.0": "post_attention_layernorm",
    "ff.1": "mlp",
}


# ---------------------------------------------------------------------------------------------------- import
def import_hf_idefics(src: str | Path, out: str | Path) -> Path:
    """Read an IdeficsForVisionText2Text folder into an mmalign checkpoint folder (self-contained)."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        IdeficsForVisionText2Text,
        LlamaConfig,
        LlamaForCausalLM,
    )

    src, out = Path(src), Path(out)
    hf = IdeficsForVisionText2Text.from_pretrained(src).eval()
    cfg = hf.config
    if not cfg.use_resampler:
        raise ValueError(
            "this IDEFICS has no Perceiver Resampler (use_resampler=false: its blocks read every ViT token); the "
            "flamingo family always resamples"
        )
    if cfg.hidden_act != "silu":
        raise ValueError(f"IDEFICS hidden_act={cfg.hidden_act!r}: the blocks' SwiGLU feed-forward is SiLU-gated")
    n_blocks = len(hf.model.gated_cross_attn_layers)
    every = cfg.cross_layer_interval
    if cfg.num_hidden_layers % every or n_blocks != cfg.num_hidden_layers // every:
        raise ValueError(
            f"IDEFICS with {cfg.num_hidden_layers} layers, {n_blocks} blocks and cross_layer_interval={every}: "
            "its own forward needs the layer count divisible by the interval"
        )

    # The vision tower: IDEFICS's is CLIP's, module for module.
    vision = cfg.vision_config
    tower = CLIPVisionModel(
        CLIPVisionConfig(**{ours: getattr(vision, theirs) for ours, theirs in VISION_FIELDS.items()})
    )
    tower.load_state_dict(hf.model.vision_model.state_dict())
    tower_dir, llm_dir = out / "encoder", out / "llm"
    tower.save_pretrained(tower_dir)
    norm = read_image_norm(src)
    (tower_dir / "mmalign_image.json").write_text(json.dumps({k: list(v) for k, v in norm.items()}))

    # The text model: a Llama whose vocabulary holds IDEFICS's main and additional rows in order.
    embed, head = _merged(hf.model.embed_tokens), _merged(hf.lm_head)
    tokenizer = AutoTokenizer.from_pretrained(src)
    text_cfg = LlamaConfig(
        vocab_size=embed.shape[0],
        **_shared_text(cfg),
        num_key_value_heads=cfg.num_attention_heads,
        **special_token_ids(tokenizer),
    )
    text = LlamaForCausalLM(text_cfg)
    text.model.layers.load_state_dict(hf.model.layers.state_dict())
    text.model.norm.load_state_dict(hf.model.norm.state_dict())
    with torch.no_grad():
        text.model.embed_tokens.weight.copy_(embed)
        if not text_cfg.tie_word_embeddings:
            text.lm_head.weight.copy_(head)
    text.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    perceiver = cfg.perceiver_config
    model_cfg = ModelConfig(
        family="flamingo",
        media={
            "image": MediaConfig(
                encoder=EncoderConfig(name="clip", path=str(tower_dir), feature_layer=-1, keep_cls=True)
            )
        },
        llm=LLMConfig(path=str(llm_dir)),
        flamingo=FlamingoConfig(
            num_latents=perceiver.resampler_n_latents,
            resampler_depth=perceiver.resampler_depth,
            resampler_heads=perceiver.resampler_n_heads,
            resampler_dim_head=perceiver.resampler_head_dim,
            qk_norm=perceiver.qk_layer_norms_perceiver,
            cross_attn_every_n_layers=every,
            xattn_qk_norm=cfg.qk_layer_norms,
            xattn_gate="vector" if cfg.alpha_type == "vector" else "scalar",
            **idefics_options(cfg),
        ),
    )
    model, tokenizer = build_model(model_cfg)
    model.connectors["image"].load_state_dict(_resampler_from_idefics(hf.model.perceiver_resampler.state_dict()))
    for theirs, ours in zip(hf.model.gated_cross_attn_layers, model.xattn.values(), strict=True):  # layer order
        ours.load_state_dict(_block_from_idefics(theirs.state_dict()))
    save_checkpoint(out, model, tokenizer, model_cfg)
    return out


def _merged(module: nn.Module) -> torch.Tensor:
    """An IDEFICS decoupled embedding or LM head as one (V + additional, D) matrix."""
    extra = _additional(module)
    weight = module.weight.detach()
    return torch.cat([weight, extra.weight.detach()]) if extra is not None else weight


def _inverse(state: dict, mapping: dict[str, str], prefix_ours: str = "", prefix_theirs: str = "") -> dict:
    """Rename `prefix_theirs + theirs + .key` -> `prefix_ours + ours + .key` for each (ours, theirs) pair."""
    out = {}
    for ours, theirs in mapping.items():
        head = f"{prefix_theirs}{theirs}."
        for key, value in state.items():
            if key.startswith(head):
                out[f"{prefix_ours}{ours}.{key[len(head) :]}"] = value
    return out


def _resampler_from_idefics(state: dict) -> dict:
    out = {
        "latents": state["latents"],
        "norm.weight": state["layer_norm.weight"],
        "norm.bias": state["layer_norm.bias"],
    }
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        out |= _inverse(state, RESAMPLER_ATTENTION, f"layers.{i}.0.", f"blocks.{i}.0.")
        out |= _inverse(state, {str(k): v for k, v in RESAMPLER_FF.items()}, f"layers.{i}.1.", f"blocks.{i}.1.")
    return out


def _block_from_idefics(state: dict) -> dict:
    out = _inverse(state, BLOCK)
    out["attn_gate"] = state["alpha_cross_attn"].reshape(-1)
    out["ff_gate"] = state["alpha_dense"].reshape(-1)
    return out
