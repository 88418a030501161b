"""Checkpoints that describe themselves: weights (safetensors), model config, training config, tokenizer.

Weights hold what cannot be reloaded from elsewhere: every trainable parameter, plus every part that was built
from a config rather than loaded from a `path`. A stage-1 checkpoint is therefore just the connector.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.config import ModelConfig, RecipeConfig, load_yaml, save_yaml
from mmalign.errors import unreadable
from mmalign.models.builder import build_model
from mmalign.train.freeze import group_of

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"
TRAIN_CONFIG = "train_config.yaml"


def _path_fields(cfg: ModelConfig) -> list[tuple[object, str]]:
    """(owner, attribute) of every path a model config loads weights from."""
    encoders = [enc for media in cfg.media.values() for enc in [media.encoder, *media.extra_encoders]]
    return [(enc, "path") for enc in encoders] + [(cfg.onellm.encoder, "path"), (cfg.llm, "path")]


def resolved_model_config(cfg: ModelConfig, folder: str | Path) -> ModelConfig:
    """A copy with absolute paths, so the checkpoint loads from any working directory; paths inside `folder` (the
    checkpoint's own parts, e.g. an imported LLM) are kept relative to it, so the folder can be moved whole."""
    from copy import deepcopy

    out = deepcopy(cfg)
    home = Path(folder).resolve()
    for owner, attr in _path_fields(out):
        path = getattr(owner, attr)
        if path:
            path = Path(path).resolve()
            setattr(owner, attr, str(path.relative_to(home)) if path.is_relative_to(home) else str(path))
    out.llm.tokenizer = None  # the checkpoint carries its own tokenizer/
    return out


def read_model_config(folder: str | Path) -> ModelConfig:
    """A checkpoint's model config with its relative paths (its own parts) made absolute again."""
    folder = Path(folder)
    cfg = load_yaml(folder / MODEL_CONFIG, ModelConfig)
    for owner, attr in _path_fields(cfg):
        path = getattr(owner, attr)
        if path and not Path(path).is_absolute():
            setattr(owner, attr, str(folder.resolve() / path))
    return cfg


def reloadable_groups(cfg: ModelConfig) -> set[str]:
    """Groups whose weights load from a `path` of their own, so a checkpoint need not repeat them."""
    if cfg.family == "onellm":  # one universal encoder; the tokenizers are always the checkpoint's own
        groups = {"encoder"} if cfg.onellm.encoder.path else set()
    else:
        groups = {
            f"encoder.{m}"
            for m, media in cfg.media.items()
            if all(enc.path for enc in [media.encoder, *media.extra_encoders])
        }
    return groups | ({"llm"} if cfg.llm.path else set())


def weights_to_save(model: nn.Module, cfg: ModelConfig, extra_groups=()) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus whole groups with nothing to reload from (no path, or given in extra_groups)."""
    reload = reloadable_groups(cfg) - set(extra_groups)
    groups = group_of(model)
    out, seen = {}, set()
    for name, p in model.named_parameters():
        keep = p.requires_grad or groups.get(name) not in reload
        if keep and p.data_ptr() not in seen:  # tied weights are stored once
            seen.add(p.data_ptr())
            out[name] = p.detach().cpu().contiguous()
    return out


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer,
    model_cfg: ModelConfig,
    recipe: RecipeConfig | None = None,
    step: int | None = None,
    extra_groups=(),
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write to temporary names, then rename: a run killed mid-save keeps its previous checkpoint.
    tmp = out / f"{WEIGHTS}.tmp"
    metadata = {"format": "pt"}
    if step is not None:  # lets resume check that weights and trainer state belong together
        metadata["step"] = str(step)
    save_file(weights_to_save(model, model_cfg, extra_groups), tmp, metadata=metadata)
    os.replace(tmp, out / WEIGHTS)
    save_yaml(resolved_model_config(model_cfg, out), out / MODEL_CONFIG)
    if recipe is not None:
        save_yaml(recipe, out / TRAIN_CONFIG)
    tokenizer.save_pretrained(out / "tokenizer")
    return out


def weights_step(path: str | Path) -> int | None:
    """The training step stamped into a checkpoint's weights file, if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError) as err:
        raise unreadable(Path(path) / WEIGHTS, err) from err
    return None if step is None else int(step)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file; is {path.parent} a checkpoint folder?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise unreadable(path, err) from err


def load_weights(model: nn.Module, path: str | Path, required: set[str] = frozenset()) -> list[str]:
    """Load a checkpoint's weights into `model`. Names the model lacks are an error (a wrong checkpoint), and so
    is a missing weight of a `required` group (one that nothing else would load)."""
    state = read_weights(Path(path) / WEIGHTS if Path(path).is_dir() else Path(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"{path}: {len(unexpected)} weights do not fit this model, e.g. {unexpected[:3]}")
    groups = group_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}  # a tied weight is saved under one of its names
    lacking = [n for n in missing if groups.get(n) in required and id(params.get(n)) not in loaded]
    if lacking:
        raise KeyError(f"{path}: {len(lacking)} required weights are missing, e.g. {lacking[:3]}")
    return list(state)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object, ModelConfig]:
    """(model, tokenizer, model config) from a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    if not (path / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not an mmalign checkpoint (no {MODEL_CONFIG})")
    cfg = read_model_config(path)
    cfg.llm.tokenizer = str(path / "tokenizer")
    if cfg.family == "onellm":  # the checkpoint holds every tokenizer: their starting weights need not exist now
        cfg.onellm.tokenizers = None
    model, tokenizer = build_model(cfg)
    load_weights(model, path, required=set(model.param_groups()) - reloadable_groups(cfg))
    return model.to(device).eval(), tokenizer, cfg


def load_train_config(path: str | Path) -> RecipeConfig:
    return load_yaml(Path(path) / TRAIN_CONFIG, RecipeConfig)
