"""Checkpoints that describe themselves: weights (safetensors), model config, training config, tokenizer.

Weights hold what cannot be reloaded from elsewhere: every trainable parameter, plus every part that was built
from a config rather than loaded from a `path`. A stage-1 checkpoint is therefore just the connector.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmalign.config import ModelConfig, RecipeConfig, load_yaml, save_yaml
from mmalign.models.builder import build_model
from mmalign.models.multimodal import MultimodalLM

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"
TRAIN_CONFIG = "train_config.yaml"
TRAINER_STATE = "trainer_state.pt"


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def resolved_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy with absolute paths, so the checkpoint loads from any working directory."""
    from copy import deepcopy

    out = deepcopy(cfg)
    out.encoder.path = _absolute(out.encoder.path)
    out.llm.path = _absolute(out.llm.path)
    out.llm.tokenizer = None  # the checkpoint carries its own tokenizer/
    return out


def weights_to_save(model: MultimodalLM, cfg: ModelConfig, extra_groups=()) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus whole groups with nothing to reload from (no path, or given in extra_groups)."""
    fresh = {"encoder": cfg.encoder.path is None, "llm": cfg.llm.path is None, "connector": True}
    fresh.update({g: True for g in extra_groups})
    out, seen = {}, set()
    for name, p in model.named_parameters():
        group = name.split(".", 1)[0]
        if (p.requires_grad or fresh[group]) and p.data_ptr() not in seen:  # tied weights are stored once
            seen.add(p.data_ptr())
            out[name] = p.detach().cpu().contiguous()
    return out


def save_checkpoint(
    out_dir: str | Path,
    model: MultimodalLM,
    tokenizer,
    model_cfg: ModelConfig,
    recipe: RecipeConfig | None = None,
    trainer_state: dict | None = None,
    extra_groups=(),
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write to temporary names, then rename: a run killed mid-save keeps its previous checkpoint.
    tmp = out / f"{WEIGHTS}.tmp"
    metadata = {"format": "pt"}
    if trainer_state is not None:  # lets resume check that weights and trainer state belong together
        metadata["step"] = str(trainer_state["state"]["step"])
    save_file(weights_to_save(model, model_cfg, extra_groups), tmp, metadata=metadata)
    os.replace(tmp, out / WEIGHTS)
    save_yaml(resolved_model_config(model_cfg), out / MODEL_CONFIG)
    if recipe is not None:
        save_yaml(recipe, out / TRAIN_CONFIG)
    tokenizer.save_pretrained(out / "tokenizer")
    if trainer_state is not None:
        torch.save(trainer_state, out / f"{TRAINER_STATE}.tmp")
        os.replace(out / f"{TRAINER_STATE}.tmp", out / TRAINER_STATE)
    return out


def weights_step(path: str | Path) -> int | None:
    """The training step stamped into a checkpoint's weights file, if any."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return None if step is None else int(step)


def load_weights(model: MultimodalLM, path: str | Path, strict_keys: bool = True) -> list[str]:
    """Load a checkpoint's weights into `model`; unexpected names are an error (a wrong checkpoint)."""
    state = load_file(str(Path(path) / WEIGHTS if Path(path).is_dir() else path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict_keys and unexpected:
        raise KeyError(f"{path}: {len(unexpected)} weights do not fit this model, e.g. {unexpected[:3]}")
    return list(state)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultimodalLM, object, ModelConfig]:
    """(model, tokenizer, model config) from a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    if not (path / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not an mmalign checkpoint (no {MODEL_CONFIG})")
    cfg = load_yaml(path / MODEL_CONFIG, ModelConfig)
    cfg.llm.tokenizer = str(path / "tokenizer")
    model, tokenizer = build_model(cfg)
    load_weights(model, path)
    return model.to(device).eval(), tokenizer, cfg


def load_recipe(path: str | Path) -> RecipeConfig:
    return load_yaml(Path(path) / TRAIN_CONFIG, RecipeConfig)
