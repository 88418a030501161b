"""The classifier as an objective of the one Trainer: per-task losses (classify, regress, retrieve), task sampling,
loss weighting, the soft-sharing penalty, held-out figures per task, and a run folder that reloads as a model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from mmalign.config import save_yaml
from mmalign.contrastive.distributed import rank_and_world
from mmalign.data.processor import SampleError
from mmalign.fusion.classifier import MultimodalClassifier, modality_dropout
from mmalign.fusion.config import ClassifierRecipe, check_classifier, load_classifier_recipe
from mmalign.fusion.data import EMBEDDED_KINDS, Labelled, load_labelled, task_specs
from mmalign.fusion.tasks import HEADLINE, TaskSpec
from mmalign.multitask.sampling import TaskSampler
from mmalign.multitask.weighting import build_weighting
from mmalign.train.loop import TooManyBadSamples
from mmalign.train.trainer import OBJECTIVE_WEIGHTS, Objective, Trainer, batch_generator

RECIPE_FILE, TASKS_FILE = "classifier.yaml", "tasks.json"
CLASSES_FILE = "classes.json"  # run folders from before regression and retrieval: every task classifies


def chosen_tasks(cfg: ClassifierRecipe) -> dict[str, TaskSpec]:
    """The tasks to train (model.tasks, or every label key of data.train), each with its kind and training-data
    statistics."""
    tasks = cfg.model.tasks
    specs = task_specs(cfg.data.train, {t: c.kind for t, c in tasks.items()},
                       {t: c.temperature for t, c in tasks.items()})  # fmt: skip
    unknown = sorted(set(tasks) - set(specs))
    if unknown:
        stale = " (embedded data from an older version? `mmalign data --dataset fusion` rewrites it)"
        hint = stale if set(unknown) <= set(EMBEDDED_KINDS) else ""
        raise ValueError(f"model.tasks names {unknown}, but {cfg.data.train} labels only {sorted(specs)}{hint}")
    return {t: specs[t] for t in sorted(tasks or specs)}


class ClassifierObjective(Objective):
    name = "classify"
    shards_data = True  # each rank takes its slice of one global batch; the Trainer wraps us in DDP

    def __init__(self, cfg: ClassifierRecipe, console: Console | None = None):
        super().__init__()
        check_classifier(cfg)
        self.cfg, self.out = cfg, Path(cfg.train.out_dir)
        console = console or Console()
        self.model = MultimodalClassifier(cfg.model, chosen_tasks(cfg))
        self.tasks = self.model.tasks
        self.weighting = build_weighting(cfg.multitask.weighting, self.tasks, **self._weighting_settings())
        encoders = {m: self.model.encoder(m) for m in self.model.modalities}
        progress = cfg.train.progress
        self.train_data = load_labelled(cfg.data.train, encoders, self.model.specs, cfg.data.folder, progress)
        self._report_errors(self.train_data, console)
        self.pools = self._task_pools()
        sizes = {t: len(p) for t, p in self.pools.items()}
        empty = [t for t, n in sizes.items() if n == 0]
        if empty:
            raise ValueError(f"no usable training sample is labelled for task(s) {empty}")
        self.everything = torch.unique(torch.cat(list(self.pools.values())))
        self.sampler = None
        if cfg.multitask.sampling != "all":
            self.sampler = TaskSampler(sizes, cfg.multitask.sampling, cfg.multitask.temperature)
            console.print(f"task sampling: {self.sampler.describe()}")
        self.val_data = None
        if cfg.data.val:
            self.val_data = load_labelled(cfg.data.val, encoders, self.model.specs, cfg.data.folder, progress)
            self._report_errors(self.val_data, console)
        self._accum = 1

    def _weighting_settings(self) -> dict:
        mt = self.cfg.multitask
        if mt.weighting in ("fixed", "pcgrad"):
            return {"weights": {t: self.cfg.model.tasks[t].weight for t in self.tasks if t in self.cfg.model.tasks}}
        if mt.weighting == "gradnorm":
            return {"alpha": mt.gradnorm_alpha}
        return {}

    def _report_errors(self, data: Labelled, console: Console) -> None:
        if not data.errors:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "skipped.jsonl", "a") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in data.errors)
        first = data.errors[0]
        if self.cfg.data.on_error == "raise":
            raise SampleError(first["id"], first["error"].split(": ", 1)[-1])
        total = len(data.errors) + len(data)
        console.print(f"[yellow]skipped {len(data.errors)} of {total} samples[/] (first: {first['error']}); "
                      f"all listed in {self.out / 'skipped.jsonl'}")  # fmt: skip
        if len(data.errors) / total > self.cfg.data.max_skip_fraction:
            raise TooManyBadSamples(
                f"{len(data.errors)} of {total} samples were bad (> data.max_skip_fraction="
                f"{self.cfg.data.max_skip_fraction}); see {self.out / 'skipped.jsonl'}"
            )

    def _task_pools(self) -> dict[str, torch.Tensor]:
        """Each task's training rows: those labelled for it, cut to tasks.<t>.max_samples. Labels outside a
        task's pool are hidden, so sampling=all cannot see more of a task than its budget."""
        pools = {}
        for t in self.tasks:
            labels = self.train_data.labels[t]
            rows = torch.nonzero(self.model.specs[t].seen(labels)).flatten()
            limit = self.cfg.model.tasks[t].max_samples if t in self.cfg.model.tasks else 0
            if limit:
                rows = rows[:limit]
                hidden = torch.ones(len(self.train_data), dtype=torch.bool)
                hidden[rows] = False
                labels[hidden] = torch.nan if labels.is_floating_point() else -1
            pools[t] = rows
        return pools

    # ------------------------------------------------------------------------------------------ data + loss
    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.everything) // batch_size)

    def batches(self, state: dict, cfg, log):
        self._accum = cfg.grad_accum
        rank, world = rank_and_world()
        mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        while True:
            generator = batch_generator(cfg.seed, state["cursor"])
            if self.sampler is None:
                tasks, pool = self.tasks, self.everything
            else:
                task = self.sampler.task_for(state["cursor"], generator)
                tasks, pool = [task], self.pools[task]
            state["cursor"] += 1
            # Every rank draws the same global batch (and the same dropout of it) and keeps its own slice.
            rows = pool[torch.randint(len(pool), (cfg.batch_size * world,), generator=generator)]
            present = {m: p[rows] for m, p in self.train_data.present.items()}
            present = modality_dropout(present, self.cfg.model.modality_dropout, generator)
            batch = self.train_data.rows(rows[mine])
            batch["present"] = {m: p[mine] for m, p in present.items()}
            batch["labels"] = {t: batch["labels"][t] for t in tasks}
            yield batch

    def counts(self, batch: dict) -> dict[str, int]:
        return {t: self.model.specs[t].count(y) for t, y in batch["labels"].items()}

    def losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        out = self.model(batch["media"], batch["present"], list(batch["labels"]))
        sums = {t: self.model.specs[t].loss(out["outputs"][t], y) for t, y in batch["labels"].items()}
        return sums, out["shared"]

    def forward(self, batch: dict, window: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total to backpropagate, and the per-task loss sums. The weighting runs here, inside the
        (DDP-wrapped) forward, so DDP sees its parameters in the graph."""
        sums, shared = self.losses(batch)
        total = self.weighting({t: s / window[t] for t, s in sums.items()}, shared)
        if self.cfg.model.sharing == "soft":  # once per optimizer step, however many micro-batches
            total = total + self.cfg.model.soft_penalty * self.model.penalty() / self._accum
        return total, sums

    def backward(self, batch: dict, window: dict[str, int], autocast) -> dict[str, float]:
        with autocast:
            total, sums = (self.forward_fn or self)(batch, window)
        total.backward()
        return {t: s.item() for t, s in sums.items()}

    def after_step(self, progress: float) -> None:
        self.weighting.after_step()

    def figures(self) -> dict[str, float]:
        row = {f"weight_{t}": w for t, w in self.weighting.weights().items()} | self.weighting.figures()
        if self.cfg.model.sharing == "soft":
            with torch.no_grad():
                row["soft_penalty"] = float(self.model.penalty())
        return row

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.cfg.model.fusion.name} fusion, {self.cfg.model.sharing} sharing, tasks {self.tasks}, " \
               f"{params:,} parameters"  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Each task's headline figure as `val_<task>` (accuracy, R², recall@1) and the others as
        `val_<task>/<figure>`."""
        if self.val_data is None:
            return {}
        row = {}
        for t, figures in task_scores(self.model, self.val_data).items():
            headline = HEADLINE[self.model.specs[t].kind]
            row |= {f"val_{t}" if k == headline else f"val_{t}/{k}": v for k, v in figures.items()}
        return row

    def save(self, out: Path, step: int) -> None:
        super().save(out, step)
        save_yaml(self.cfg, out / RECIPE_FILE)
        specs = {t: spec.to_dict() for t, spec in self.model.specs.items()}
        (out / TASKS_FILE).write_text(json.dumps(specs, indent=1))


@torch.no_grad()
def task_scores(model: MultimodalClassifier, data: Labelled, hide: tuple[str, ...] = (),
                batch_size: int = 256) -> dict[str, dict[str, float]]:  # fmt: skip
    """Held-out figures per task (`TaskSpec.scores`); modalities in `hide` are masked off every sample (as if
    missing). Retrieval ranks each sample against all the others, so predictions are gathered first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = {t: [] for t in model.tasks}
    for start in range(0, len(data), batch_size):
        batch = data.rows(torch.arange(start, min(start + batch_size, len(data))))
        media = {m: x.to(device) for m, x in batch["media"].items()}
        present = {m: (p & (m not in hide)).to(device) for m, p in batch["present"].items()}
        outputs = model(media, present)["outputs"]
        for t in model.tasks:
            preds[t].append(model.specs[t].predict(outputs[t]).cpu())
    model.train(was_training)
    scores = {t: model.specs[t].scores(torch.cat(preds[t]), data.labels[t]) for t in model.tasks if preds[t]}
    return {t: s for t, s in scores.items() if s}


def headline(model: MultimodalClassifier, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each task's headline figure: accuracy, R² or recall@1."""
    return {t: s[HEADLINE[model.specs[t].kind]] for t, s in scores.items()}


def scores_by_inputs(model: MultimodalClassifier, data: Labelled) -> dict[str, dict[str, dict[str, float]]]:
    """Figures per task with every modality and with each one hidden."""
    figures = {"all": task_scores(model, data)}
    if len(model.modalities) > 1:
        figures |= {f"without {m}": task_scores(model, data, hide=(m,)) for m in model.modalities}
    return figures


def held_out(summary: dict) -> dict[str, float]:
    """Each task's headline figure on data.val from a `train_classifier` summary: the Trainer's final
    evaluation."""
    return {name.removeprefix("val_"): value for name, value in summary["eval"].items() if "/" not in name}


def train_classifier(cfg: ClassifierRecipe, resume: bool = False, console: Console | None = None) -> dict:
    torch.manual_seed(cfg.train.seed)
    objective = ClassifierObjective(cfg, console)
    summary = Trainer(objective, cfg.train, console=console, resume=resume).fit()
    return summary | {"objective": objective}


def load_classifier(run: str | Path) -> MultimodalClassifier:
    """The model of a finished (or stopped) `mmalign classify train` run folder."""
    from safetensors.torch import load_file

    run = Path(run)
    if not (run / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a classifier run folder (no {RECIPE_FILE})")
    cfg = load_classifier_recipe(run / RECIPE_FILE)
    if (run / TASKS_FILE).is_file():
        specs = {t: TaskSpec(**d) for t, d in json.loads((run / TASKS_FILE).read_text()).items()}
    else:
        specs = {t: TaskSpec(classes=c) for t, c in json.loads((run / CLASSES_FILE).read_text()).items()}
    model = MultimodalClassifier(cfg.model, specs)
    state = load_file(str(run / OBJECTIVE_WEIGHTS))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval()
