"""Typed recipe configs: dataclasses that load from YAML, save to YAML and take `key=value` overrides.

Every field carries a `help` string in its metadata; the CLI prints them, so `--help` documents every key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class EncoderConfig:
    name: str = _f("clip", "encoder family from the registry: clip | siglip")
    path: str | None = _f(None, "folder of a Hugging Face vision model (or a full CLIP/SigLIP model); None = build")
    preset: str | None = _f(None, "built-in size when building from config: tiny-vit")
    config: dict = _f({}, "extra Hugging Face vision config keys when building from config")
    feature_layer: int = _f(-2, "hidden layer whose output feeds the connector (LLaVA-1.5 uses -2)")
    keep_cls: bool = _f(False, "keep the CLS token (LLaVA 'full') or drop it ('default')")


@dataclass
class ConnectorConfig:
    name: str = _f("mlp2x_gelu", "connector: linear | mlpNx_gelu (N layers; mlp2x_gelu is LLaVA-1.5's)")
    bias: bool = _f(True, "bias in the connector's linear layers")


@dataclass
class LLMConfig:
    path: str | None = _f(None, "folder of a Hugging Face causal LM; None = build from `config`")
    config: dict = _f({}, "Hugging Face config keys (with model_type) to build a fresh LLM")
    tokenizer: str | None = _f(None, "tokenizer folder; defaults to `path`")
    dtype: str = _f("float32", "weights dtype: float32 | bfloat16 | float16")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token: str = _f("<image>", "placeholder in the text; expanded to one token per image feature")
    lora: dict = _f({}, "LoRA adapters on the LLM ({r, alpha, dropout, targets}); set by train.finetune=lora")


@dataclass
class DataConfig:
    train: str = _f("", "LLaVA-format JSON/JSONL for training")
    val: str | None = _f(None, "LLaVA-format JSON/JSONL for validation loss")
    image_folder: str = _f("", "folder that the `image` paths are relative to")
    template: str = _f("chat", "plain (stage 1: <image> caption) | chat (the tokenizer's chat template)")
    chat_template: str | None = _f(
        None, "Jinja chat template replacing the tokenizer's (for LLMs that ship none); saved with the checkpoint"
    )
    max_length: int = _f(512, "longest tokenized sample, image tokens included")
    on_error: str = _f("skip", "bad sample: skip (count and go on) | raise (save a checkpoint, then stop)")
    max_skip_fraction: float = _f(0.1, "stop when more than this fraction of samples seen were skipped")
    num_workers: int = _f(0, "DataLoader worker processes")
    blank_image_prob: float = _f(
        0.0, "chance a training image is replaced by zeros (modality dropout: blind questions get prior answers)"
    )


@dataclass
class TrainConfig:
    out_dir: str = _f("runs/train", "where checkpoints and logs go")
    trainable: list = _f(["connector"], "parameter groups to train: encoder, connector, llm")
    finetune: str = _f("full", "how the LLM trains when in `trainable`: full | lora")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "LLM module names that get LoRA (only inside the LLM, never the encoder)",
    )
    init_from: str | None = _f(None, "checkpoint whose weights initialise this run (e.g. the stage-1 connector)")
    lr: float = _f(1e-3, "peak learning rate")
    connector_lr: float | None = _f(None, "learning rate for the connector group; None = lr")
    weight_decay: float = _f(0.0, "AdamW weight decay (never on biases, norms or other 1-D parameters)")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warm-up before the cosine decay")
    epochs: float = _f(1.0, "passes over the training data (used when max_steps is 0)")
    max_steps: int = _f(0, "optimizer steps; 0 = from epochs")
    batch_size: int = _f(16, "samples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    clip_grad: float = _f(1.0, "max gradient norm; 0 disables")
    precision: str = _f("auto", "auto (bf16 autocast where the hardware has it) | bf16 | fp32")
    seed: int = _f(0, "seed for init, data order and dropout")
    eval_every: int = _f(0, "steps between validation passes; 0 = only at the end")
    save_every: int = _f(0, "steps between resumable checkpoints; 0 = only at the end")
    log_every: int = _f(10, "steps between log lines in metrics.jsonl")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------- (de)serialising


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; known: {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_dict(hint, value, f"{where}{f.name}.")
        else:
            kwargs[f.name] = _convert(value, hint, f"{where}{f.name}")
    return cls(**kwargs)


def load_yaml(path: str | Path, cls: type = RecipeConfig) -> Any:
    with open(path) as fh:
        return from_dict(cls, yaml.safe_load(fh) or {})


def save_yaml(cfg: Any, path: str | Path) -> None:
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check a parsed value against the field's type hint, converting where the intent is clear."""
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and not isinstance(value, bool):
            try:  # YAML 1.1 reads "2e-5" as a string; Python reads it as the float it is
                return float(value)
            except (TypeError, ValueError):
                pass
        if base is str and value is not None:
            return value if isinstance(value, str) else str(value)
        if base is not type(None) and isinstance(value, base):
            return value
    raise ValueError(f"config key {key}={value!r}: expected {hint}")


def _coerce(text: str, hint: Any, key: str) -> Any:
    """Turn the text of `key=value` into the field's type; YAML syntax covers lists, dicts and None. A string
    field keeps the text as typed (YAML would turn `1.10` into 1.1 and `no` into False)."""
    value = yaml.safe_load(text)
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if str in allowed and not (value is None and type(None) in allowed):
        return text
    return _convert(value, hint, key)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings in place; unknown keys and wrong types are errors that name the key."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = cfg
        for p in parents:
            if isinstance(node, dict):  # inside a free-form dict such as llm.config: create levels as needed
                node = node.setdefault(p, {})
                continue
            if not dataclasses.is_dataclass(node) or not hasattr(node, p):
                raise KeyError(f"unknown config key {key!r}")
            node = getattr(node, p)
        if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
            if isinstance(node, dict):  # free-form dicts such as llm.config
                node[leaf] = yaml.safe_load(text)
                continue
            raise KeyError(f"unknown config key {key!r}")
        hint = typing.get_type_hints(type(node))[leaf]
        setattr(node, leaf, _coerce(text, hint, key))
    return cfg


def describe(cls: type = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key: the table behind `mmalign train --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
