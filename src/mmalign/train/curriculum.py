"""Curricula: a recipe's `stages` run in order, each a plain training run that starts from the previous stage's
checkpoint, trains only its declared groups, and mixes in a seeded share of earlier stages' data so what was learnt
first is not forgotten (OneLLM's progressive alignment). Before anything trains, the run prints one table of what
every stage trains and freezes. A finished stage leaves `stage.json`; a rerun with resume skips it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmalign.config import ConfigError, RecipeConfig, StageConfig, apply_overrides, check_recipe, save_yaml
from mmalign.data.dataset import subset_size
from mmalign.data.processor import read_records
from mmalign.train.trainer import TRAINER_STATE

STAGE_DONE = "stage.json"


def stage_dirs(cfg: RecipeConfig) -> list[Path]:
    return [Path(cfg.train.out_dir) / f"{i}-{s.name}" for i, s in enumerate(cfg.stages, 1)]


def stage_recipe(cfg: RecipeConfig, index: int, counts: dict[str, int]) -> RecipeConfig:
    """The plain recipe of stage `index` (0-based): its files plus replay, trainables, length, folder and start."""
    stage: StageConfig = cfg.stages[index]
    if not stage.data:
        raise ConfigError(f"stages.{index} ({stage.name}) names no training data (stages.{index}.data)")
    out = copy.deepcopy(cfg)
    out.stages = []
    earlier = list(dict.fromkeys(f for s in cfg.stages[:index] for f in s.data if f not in stage.data))
    files, fractions = list(stage.data), [1.0] * len(stage.data)
    if stage.replay and earlier:
        share = stage.replay * sum(counts[f] for f in files) / sum(counts[f] for f in earlier)
        files += earlier
        fractions += [share] * len(earlier)
    out.data.train, out.data.train_fractions = files, fractions
    out.train.trainable = list(stage.trainable or cfg.train.trainable)
    out.train.epochs = stage.epochs or cfg.train.epochs
    out.train.lr = stage.lr or cfg.train.lr
    dirs = stage_dirs(cfg)
    out.train.out_dir = str(dirs[index])
    out.train.init_from = str(dirs[index - 1]) if index else cfg.train.init_from
    apply_overrides(out, [*stage.overrides])
    check_recipe(out)
    return out


def compact(groups: list[str], every: list[str]) -> str:
    """Group names shortened for the plan table: `connector.*` when every group under a prefix is listed,
    `tokenizer.{video, audio}` for some of them."""
    parts, done = [], set()
    for g in groups:
        head = g.split(".")[0]
        if "." not in g or head in done:
            parts += [] if head in done else [g]
            continue
        done.add(head)
        mine = [x for x in groups if x.startswith(head + ".")]
        siblings = [x for x in every if x.startswith(head + ".")]
        if len(mine) == len(siblings) and len(mine) > 1:
            parts.append(f"{head}.*")
        elif len(mine) == 1:
            parts.append(mine[0])
        else:
            parts.append(head + ".{" + ", ".join(x[len(head) + 1 :] for x in mine) + "}")
    return ", ".join(parts)


def plan_table(cfg: RecipeConfig, recipes: list[RecipeConfig], counts: dict[str, int]) -> Table:
    """Stage by stage: its samples (new + replayed), what trains and what stays frozen, by declared group."""
    from mmalign.models.builder import build_model
    from mmalign.train.freeze import count_parameters, select_groups

    model, _ = build_model(cfg.model)
    sizes = {g: total for g, (_, total) in count_parameters(model).items()}
    table = Table(title=f"curriculum: {len(recipes)} stages (all groups not listed as trained are frozen)")
    for col in ("stage", "samples (new + replay)", "trains", "frozen", "trained params"):
        table.add_column(col)
    for stage, recipe in zip(cfg.stages, recipes, strict=True):
        trained = select_groups(model, recipe.train.trainable)
        new = sum(counts[f] for f in stage.data)
        replay = sum(
            subset_size(counts[f], frac)
            for f, frac in zip(recipe.data.train, recipe.data.train_fractions, strict=True)
            if f not in stage.data
        )
        frozen = [g for g in sizes if g not in trained]
        table.add_row(
            stage.name,
            f"{new} + {replay}",
            compact(trained, list(sizes)),
            compact(frozen, list(sizes)) or "-",
            f"{sum(sizes[g] for g in trained):,}",
        )
    return table


def run_curriculum(cfg: RecipeConfig, resume: bool = False, console: Console | None = None) -> list[dict]:
    """Train every stage in order; returns each stage's summary. With resume, finished stages are skipped and an
    interrupted one continues from its last checkpoint."""
    from mmalign.train.loop import train

    console = console or Console()
    counts = {f: len(read_records(f)) for s in cfg.stages for f in s.data}
    recipes = [stage_recipe(cfg, i, counts) for i in range(len(cfg.stages))]
    console.print(plan_table(cfg, recipes, counts))
    summaries = []
    for stage, recipe in zip(cfg.stages, recipes, strict=True):
        out = Path(recipe.train.out_dir)
        if resume and (out / STAGE_DONE).is_file():
            console.print(f"[dim]stage {stage.name}: done before, skipped[/]")
            summaries.append(json.loads((out / STAGE_DONE).read_text()))
            continue
        console.print(f"[bold]stage {stage.name}[/]: trains {', '.join(recipe.train.trainable)}")
        save_yaml(recipe, out / "train_config.yaml")
        interrupted = resume and (out / TRAINER_STATE).is_file()
        summary = {"stage": stage.name, "checkpoint": str(out)} | train(recipe, resume=interrupted, console=console)
        (out / STAGE_DONE).write_text(json.dumps(summary, default=str))
        summaries.append(summary)
    return summaries
