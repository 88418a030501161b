"""What a modality is: its placeholder, its record key, how a raw input loads and becomes a tensor, and its
default encoder. Each modality is one file that registers one `Modality`; processor, collator, model, generation
and evaluation look modalities up here and never name one themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.registry import Registry


class MediaError(ValueError):
    """A media input that cannot be used (missing, unreadable, wrong kind)."""


@dataclass(frozen=True)
class Modality:
    """`load(source) -> raw` validates a path, bytes or array; `preprocess(raw, encoder) -> tensor` makes one
    item's model input with the encoder's own settings (size, normalisation, sample rate). Items of one modality
    stack along a new first dimension, so every item of a modality must come out the same shape."""

    name: str
    placeholder: str  # the text marker, expanded by the processor into one token per encoder feature
    record_key: str  # the key of a LLaVA-style record that holds this modality's path or list of paths
    default_encoder: str  # ENCODERS entry used when a recipe names the modality without an encoder
    load: Callable[[Any], Any]
    preprocess: Callable[[Any, Any], torch.Tensor]
    # The onellm family's lightweight tokenizer: `tokenizer(universal_encoder, settings) -> module` turning
    # preprocessed items (items, ...) into tokens of the universal encoder's width (items, num_tokens, width).
    # The module carries the attributes `preprocess` reads, as an encoder would. None: no onellm support.
    tokenizer: Callable[[Any, dict], Any] | None = None

    def resolve(self, source: Any, folder: str | Path = "") -> Any:
        """A record's relative path resolved against the media folder; arrays and bytes pass through."""
        return Path(folder) / source if isinstance(source, str) else source


MODALITIES = Registry("modality")


def register_modality(modality: Modality) -> Modality:
    MODALITIES.register(modality.name)(modality)
    return modality


def get_modality(name: str) -> Modality:
    import mmalign.modalities  # noqa: F401  (registers the built-in modalities)

    return MODALITIES.get(name)
