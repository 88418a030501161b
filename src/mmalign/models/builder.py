"""`build_model(config)`: the one place a ModelConfig becomes modules, for any registered alignment family."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmalign.config import ConfigError, MediaConfig, ModelConfig
from mmalign.constants import END_OF_CHUNK
from mmalign.modalities import get_modality
from mmalign.models import encoders as _encoders  # noqa: F401  (registers encoders)
from mmalign.models import token_encoder as _token_encoder  # noqa: F401  (registers modality-transformer)
from mmalign.models.adapters import inject_adapters
from mmalign.models.connectors import FusingConnector  # importing it also registers the connectors
from mmalign.models.encoders import FusedEncoder
from mmalign.models.flamingo import FlamingoLM
from mmalign.models.llm import load_llm, load_tokenizer
from mmalign.models.multimodal import MultimodalLM
from mmalign.models.onellm import OneLLMLM
from mmalign.models.resampler import PerceiverResampler
from mmalign.models.upm import UniversalProjection
from mmalign.registry import CONNECTORS, ENCODERS, FAMILIES, register_family

# Logit transforms some LLMs apply after the LM head; the sparse-loss path calls the head directly.
UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_model_config(cfg: ModelConfig) -> None:
    """Every name in the config exists in its registry: checked before anything is built or loaded."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r}: registered families are {', '.join(FAMILIES.names())}")
    if cfg.family == "onellm" and cfg.onellm.encoder.name not in ENCODERS:
        raise ConfigError(
            f"model.onellm.encoder.name={cfg.onellm.encoder.name!r}: registered encoders are "
            f"{', '.join(ENCODERS.names())}"
        )
    for modality, media in cfg.media.items():
        try:
            spec = get_modality(modality)
        except KeyError as err:
            raise ConfigError(f"model.media.{modality}: {err.args[0]}") from None
        if cfg.family == "onellm":
            if spec.tokenizer is None:
                raise ConfigError(f"model.media.{modality}: the {modality} modality registers no onellm tokenizer")
            continue  # the family reads no per-modality encoder or connector
        for i, enc in enumerate([media.encoder, *media.extra_encoders]):
            if enc.name not in ENCODERS:
                where = "encoder" if i == 0 else f"extra_encoders.{i - 1}"
                raise ConfigError(
                    f"model.media.{modality}.{where}.name={enc.name!r}: registered encoders are "
                    f"{', '.join(ENCODERS.names())}"
                )
        if media.connector.name not in CONNECTORS:
            raise ConfigError(
                f"model.media.{modality}.connector.name={media.connector.name!r}: registered connectors are "
                f"{', '.join(CONNECTORS.names())}"
            )
        if media.connector.fusion:
            check_connector_fusion(cfg.family, modality, media)


def check_connector_fusion(family: str, modality: str, media: MediaConfig) -> None:
    from mmalign.fusion.modules import FUSIONS

    where = f"model.media.{modality}.connector.fusion"
    if family != "projector":
        raise ConfigError(f"{where}: fusing encoders in the connector is for the projector family, not {family}")
    if not media.extra_encoders:
        raise ConfigError(f"{where} fuses several encoders' features: add model.media.{modality}.extra_encoders")
    unknown = sorted(set(media.connector.fusion) - {"name", "dim", "settings"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; keys are name, dim, settings")
    name = media.connector.fusion.get("name", "concat")
    if name not in FUSIONS:
        raise ConfigError(f"{where}.name={name!r}: registered fusion modules are {', '.join(FUSIONS.names())}")


def build_connector(media: MediaConfig, encoder: nn.Module, out_dim: int) -> nn.Module:
    """A modality's connector into the LLM; with `connector.fusion`, a fusion module of the encoders' features
    per token ahead of it."""
    c = media.connector
    if c.fusion:
        return FusingConnector(parts=encoder.parts, projector=c.name, out_dim=out_dim, bias=c.bias, **c.fusion)
    return CONNECTORS.build(c.name, in_dim=encoder.hidden_size, out_dim=out_dim, bias=c.bias)


def check_llm(llm: nn.Module) -> None:
    for name in UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(llm.config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"LLM config sets {name}={value}; mmalign does not apply it yet")


def build_encoder(media: MediaConfig, modality: str) -> nn.Module:
    """A modality's encoder; with extra encoders, all of them fused per token."""
    encoders = [
        ENCODERS.build(
            enc.name,
            modality=modality,
            path=enc.path,
            preset=enc.preset,
            config=enc.config,
            feature_layer=enc.feature_layer,
            keep_cls=enc.keep_cls,
        )
        for enc in [media.encoder, *media.extra_encoders]
    ]
    return encoders[0] if len(encoders) == 1 else FusedEncoder(encoders)


def placeholders(cfg: ModelConfig) -> dict[str, str]:
    """{modality: its placeholder text} for the modalities this model reads."""
    return {m: get_modality(m).placeholder for m in cfg.media}


@register_family("projector")
def build_projector(cfg: ModelConfig, tokenizer) -> MultimodalLM:
    """LLaVA-style early fusion: per modality an encoder and a projector into the LLM's embedding space."""
    llm = load_llm(cfg.llm, tokenizer)
    check_llm(llm)
    hidden = llm.get_input_embeddings().embedding_dim
    encoders = {m: build_encoder(media, m) for m, media in cfg.media.items()}
    connectors = {m: build_connector(media, encoders[m], hidden) for m, media in cfg.media.items()}
    ids = {m: tokenizer.convert_tokens_to_ids(text) for m, text in placeholders(cfg).items()}
    return MultimodalLM(encoders=encoders, connectors=connectors, llm=llm, media_token_ids=ids)


@register_family("flamingo")
def build_flamingo(cfg: ModelConfig, tokenizer) -> FlamingoLM:
    """Flamingo-style deep fusion: per modality an encoder and a Perceiver Resampler; gated cross-attention
    blocks in front of the LLM's decoder layers (model.flamingo)."""
    llm = load_llm(cfg.llm, tokenizer)
    check_llm(llm)
    fl = cfg.flamingo
    encoders = {m: build_encoder(media, m) for m, media in cfg.media.items()}
    media_dim = next(iter(encoders.values())).hidden_size  # the first modality's width; others map into it
    resamplers = {
        m: PerceiverResampler(
            in_dim=enc.hidden_size,
            out_dim=media_dim,
            num_latents=fl.num_latents,
            depth=fl.resampler_depth,
            heads=fl.resampler_heads,
            dim_head=fl.resampler_dim_head,
            ff_mult=fl.ff_mult,
            max_frames=fl.max_frames,
            activation=fl.activation,
            qk_norm=fl.qk_norm,
        )
        for m, enc in encoders.items()
    }
    ids = {m: tokenizer.convert_tokens_to_ids(text) for m, text in placeholders(cfg).items()}
    return FlamingoLM(
        encoders=encoders, resamplers=resamplers, llm=llm, media_token_ids=ids,
        end_of_chunk_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK), cfg=fl,
    )  # fmt: skip


def load_tokenizers(tokenizers: dict[str, nn.Module], folder: Path) -> None:
    """Start each tokenizer from folder/<modality>.safetensors where there is one."""
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise ConfigError(f"model.onellm.tokenizers={str(folder)!r} is not a folder (of <modality>.safetensors)")
    for m, module in tokenizers.items():
        path = folder / f"{m}.safetensors"
        if path.is_file():
            try:
                module.load_state_dict(load_file(str(path)))
            except RuntimeError as e:
                raise ConfigError(f"{path} does not fit the {m} tokenizer: {e}") from None


@register_family("onellm")
def build_onellm(cfg: ModelConfig, tokenizer) -> OneLLMLM:
    """OneLLM-style: per modality its registered tokenizer, one universal encoder (model.onellm.encoder) and the
    Universal Projection Module into the LLM's embedding space."""
    llm = load_llm(cfg.llm, tokenizer)
    check_llm(llm)
    oc = cfg.onellm
    enc = oc.encoder
    universal = ENCODERS.build(enc.name, path=enc.path, preset=enc.preset, config=enc.config,
                               feature_layer=enc.feature_layer, keep_cls=enc.keep_cls)  # fmt: skip
    tokenizers = {m: get_modality(m).tokenizer(universal, dict(media.tokenizer)) for m, media in cfg.media.items()}
    if oc.tokenizers:
        load_tokenizers(tokenizers, Path(oc.tokenizers))
    upm = UniversalProjection(
        universal.hidden_size,
        llm.get_input_embeddings().embedding_dim,
        list(cfg.media),
        num_experts=oc.num_experts,
        num_queries=oc.num_queries,
        depth=oc.expert_depth,
        heads=oc.expert_heads,
        router_hidden=oc.router_hidden,
        router=oc.router,
        route_on=oc.route_on,
        queries=oc.queries,
    )
    ids = {m: tokenizer.convert_tokens_to_ids(text) for m, text in placeholders(cfg).items()}
    return OneLLMLM(tokenizers=tokenizers, universal=universal, upm=upm, llm=llm, media_token_ids=ids)


def special_tokens(cfg: ModelConfig) -> list[str]:
    """Tokens the tokenizer must have for this model: the media placeholders, and the family's own."""
    return list(placeholders(cfg).values()) + ([END_OF_CHUNK] if cfg.family == "flamingo" else [])


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[nn.Module, object]:
    """Returns (model, tokenizer). Weights come from the configured paths or fresh initialisation."""
    check_model_config(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg.llm, special_tokens(cfg))
    model = FAMILIES.build(cfg.family, cfg=cfg, tokenizer=tokenizer)
    if cfg.lora is not None:  # adapters a checkpoint was trained with, on the module names it recorded
        inject_adapters(model, cfg.lora)
    return model, tokenizer
