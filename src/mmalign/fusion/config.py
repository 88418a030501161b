"""The classifier recipe: encoders + fusion + task heads (classify, regress or retrieve), multi-task settings,
data, and the shared TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmalign.config import ConfigError, EncoderConfig, TrainConfig, _f, apply_overrides, load_yaml


@dataclass
class FusionConfig:
    name: str = _f("concat", "fusion module: concat | attention | gated | product | bilinear | tensor")
    dim: int = _f(64, "width of the fused representation and the trunk", ge=1)
    settings: dict = _f({}, "module options (attention: depth, heads; bilinear and tensor: rank)")


@dataclass
class TaskConfig:
    kind: Literal["classify", "regress", "retrieve"] = _f(
        "classify", "classify (a class) | regress (a number) | retrieve (an embedding; equal labels are matches)"
    )
    temperature: float = _f(0.1, "kind=retrieve: the contrastive loss's temperature", gt=0.0)
    level: int = _f(-1, "trunk level the head reads: 0 = fusion output, 1.. = after each block, -1 = the top")
    weight: float = _f(1.0, "loss weight (multitask.weighting=fixed)", ge=0.0)
    max_samples: int = _f(0, "use only the first N training samples labelled for this task; 0 = all", ge=0)


@dataclass
class ClassifierModelConfig:
    encoders: dict[str, EncoderConfig] = _f({}, "one encoder per modality, keyed by modality name")
    fusion: FusionConfig = field(default_factory=FusionConfig, metadata={"help": "how modality features combine"})
    trunk_depth: int = _f(2, "residual MLP blocks after the fusion module", ge=0)
    tasks: dict[str, TaskConfig] = _f({}, "per-task settings; tasks are the label keys of the training data")
    sharing: Literal["hard", "soft"] = _f(
        "hard", "hard (one tower, a head per task) | soft (a tower per task + distance penalty)"
    )
    soft_penalty: float = _f(
        1.0, "weight of the soft-sharing penalty (sharing=soft); `classify compare-multitask` shows a sweep", ge=0.0
    )
    modality_dropout: float = _f(0.0, "chance each modality of a training sample is hidden (never all)", ge=0.0)


@dataclass
class MultiTaskConfig:
    weighting: Literal["fixed", "uncertainty", "gradnorm", "pcgrad"] = _f(
        "fixed",
        "fixed (tasks.<t>.weight) | uncertainty (Kendall et al. 2018) | gradnorm (Chen et al. 2018) | "
        "pcgrad (Yu et al. 2020, projection of conflicting gradients, with the tasks.<t>.weight weights)",
    )
    sampling: Literal["all", "proportional", "temperature", "round_robin", "uniform"] = _f(
        "all", "all (every batch from all samples, every labelled task) | a strategy drawing one task per batch"
    )
    temperature: float = _f(2.0, "sampling=temperature: p ~ size^(1/T)", gt=0.0)
    gradnorm_alpha: float = _f(1.5, "GradNorm's restoring-force strength", ge=0.0)


@dataclass
class ClassifierDataConfig:
    train: str = _f("", "JSONL/JSON records: id, one path per modality key, and `labels` {task: class}")
    val: str | None = _f(None, "held-out records scored at eval_every and at the end")
    folder: str = _f("", "folder that media paths are relative to; default: the train file's folder")
    on_error: Literal["skip", "raise"] = _f("skip", "a bad sample: skip it (counted) | raise")
    max_skip_fraction: float = _f(0.1, "stop when more than this fraction of samples is bad", ge=0.0)


@dataclass
class ClassifierRecipe:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_classifier(cfg: ClassifierRecipe) -> None:
    if not cfg.model.encoders:
        raise ConfigError("model.encoders is empty: give at least one modality's encoder")
    if cfg.multitask.weighting in ("gradnorm", "pcgrad") and cfg.model.sharing != "hard":
        raise ConfigError(
            f"multitask.weighting={cfg.multitask.weighting} needs a shared representation: set model.sharing=hard"
        )
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a JSONL/JSON file of labelled records")


def load_classifier_recipe(path: str | Path, overrides: list[str] = ()) -> ClassifierRecipe:
    cfg = apply_overrides(load_yaml(path, ClassifierRecipe), list(overrides))
    check_classifier(cfg)
    return cfg
