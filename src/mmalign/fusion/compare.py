"""The two comparisons the classifier exists to make, on the embedded image + sound data:

- fusion: every fusion module trained on a label that needs the image and the sound together, beside models that
  see one modality only: `mix` (classify; one modality stays at chance, 1/3), `total` (regress; one modality
  explains half the variance, R² 0.5) or `pair` (retrieve; one modality's recall@1 is at most 1/3);
- multi-task: colour, pitch and mix trained alone, with hard sharing (three loss weightings), hierarchically
  (colour and pitch supervised at the fusion output, mix at the top) and with soft sharing. mix gets only a few
  labelled samples (`mix_samples`), so the comparison shows what the other tasks' labels give it.
"""

from __future__ import annotations

import json
import time
from copy import deepcopy
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmalign.config import apply_overrides, resolve_recipe
from mmalign.data.processor import read_records
from mmalign.fusion.config import TaskConfig, load_classifier_recipe
from mmalign.fusion.data import EMBEDDED_KINDS, write_fusion_dataset
from mmalign.fusion.modules import FUSIONS
from mmalign.fusion.tasks import HEADLINE, LABELS, format_score
from mmalign.fusion.train import headline, held_out, task_scores, train_classifier

FUSION_METHODS = ["concat", "attention", "gated", "product", "bilinear", "tensor"]
# What a model that sees one modality only can reach on each label that needs both.
ONE_MODALITY = {"mix": "chance 1/3", "total": "one input alone: R² 0.5", "pair": "one input alone: R@1 <= 1/3"}


def ensure_data(data_dir: Path, n_train: int, n_test: int, seed: int, progress: bool, console: Console) -> None:
    """Write the embedded data unless it is there with every label (a folder from an older version may lack some)."""
    train = data_dir / "train.jsonl"
    if train.is_file() and set(read_records(train)[0].get("labels", {})) >= set(EMBEDDED_KINDS):
        return
    if train.is_file():
        console.print(f"{data_dir} lacks some of the labels {sorted(EMBEDDED_KINDS)}: writing it again")
    write_fusion_dataset(data_dir, n_train, n_test, seed, progress)


def base_recipe(data_dir: Path, out: Path, steps: int, seed: int, progress: bool, overrides=()):
    cfg = load_classifier_recipe(resolve_recipe("classify_av"))
    cfg.data.train, cfg.data.val = str(data_dir / "train.jsonl"), str(data_dir / "test.jsonl")
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.seed, cfg.train.progress = str(out), steps, seed, progress
    return apply_overrides(cfg, list(overrides))


def run_one(cfg, console: Console, each_hidden: bool = False) -> dict:
    """Train one model; its held-out headline figure per task (accuracy, R² or recall@1), size and time (and, with
    `each_hidden`, the figures with each modality hidden in turn)."""
    start = time.time()
    summary = train_classifier(cfg, console=console)
    objective = summary["objective"]
    model = objective.model
    row = {
        "score": held_out(summary),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - start, 1),
    }
    if each_hidden and len(model.modalities) > 1:
        hidden = {m: task_scores(model, objective.val_data, hide=(m,)) for m in model.modalities}
        row["without"] = {m: headline(model, scores) for m, scores in hidden.items()}
    return row


def finish(result: dict, out: Path, table, console: Console) -> dict:
    """Write results.json and print the comparison's table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    console.print(table(result))
    return result


def compare_fusion(data_dir: str | Path = "data/fusion", out: str | Path = "runs/fusion", *, task: str = "mix",
                   steps: int = 1000, methods: list[str] | None = None, n_train: int = 2000, n_test: int = 300,
                   seed: int = 0, progress: bool = True, overrides=(),
                   console: Console | None = None) -> dict:  # fmt: skip
    console = console or Console()
    data_dir, out = Path(data_dir), Path(out)
    methods = methods or FUSION_METHODS
    unknown = [m for m in methods if m not in FUSIONS]
    if unknown:
        raise ValueError(f"unknown fusion method(s) {unknown}; registered: {', '.join(FUSIONS.names())}")
    if task not in ONE_MODALITY:
        raise ValueError(f"unknown task {task!r}; the labels that need both inputs: {', '.join(ONE_MODALITY)}")
    ensure_data(data_dir, n_train, n_test, seed, progress, console)
    rows = {}
    base = base_recipe(data_dir, out, steps, seed, progress, overrides)
    kind = EMBEDDED_KINDS[task]
    base.model.tasks = {task: TaskConfig(kind=kind)}
    for only in sorted(base.model.encoders):  # one modality: the chance baselines
        cfg = deepcopy(base)
        cfg.model.encoders = {only: cfg.model.encoders[only]}
        cfg.train.out_dir = str(out / f"{only}-only")
        rows[f"{only} only"] = run_one(cfg, console, each_hidden=True)
    for method in methods:
        cfg = deepcopy(base)
        cfg.model.fusion.name = method
        cfg.train.out_dir = str(out / method)
        rows[method] = run_one(cfg, console, each_hidden=True)
    result = {"task": task, "kind": kind, "metric": HEADLINE[kind], "one_modality": ONE_MODALITY[task],
              "steps": steps, "rows": rows}  # fmt: skip
    return finish(result, out, fusion_table, console)


def fusion_table(result: dict) -> Table:
    task, metric = result["task"], result["metric"]
    table = Table(title=f"held-out {LABELS[metric]} on {task} (needs image and sound; {result['one_modality']})")
    for col in ("model", f"{task} {LABELS[metric]}", "params", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, row in result["rows"].items():
        score = format_score(metric, row["score"][task])
        table.add_row(name, score, f"{row['parameters']:,}", f"{row['seconds']:.0f}")
    return table


MULTITASK_SETUPS = {
    "hard": {},
    "hard + uncertainty": {"multitask.weighting": "uncertainty"},
    "hard + gradnorm": {"multitask.weighting": "gradnorm"},
    "hard + pcgrad": {"multitask.weighting": "pcgrad"},
    "hierarchical": {"levels": {"colour": 0, "pitch": 0}},
    "soft": {"model.sharing": "soft"},  # the default penalty, 1
    "soft @ 0.01": {"model.sharing": "soft", "model.soft_penalty": 0.01},
    "soft @ 0.1": {"model.sharing": "soft", "model.soft_penalty": 0.1},
    "soft @ 10": {"model.sharing": "soft", "model.soft_penalty": 10.0},
}


def compare_multitask(data_dir: str | Path = "data/fusion", out: str | Path = "runs/multitask", *, steps: int = 600,
                      mix_samples: int = 200, setups: list[str] | None = None, n_train: int = 2000,
                      n_test: int = 300, seed: int = 0, progress: bool = True, overrides=(),
                      console: Console | None = None) -> dict:  # fmt: skip
    console = console or Console()
    data_dir, out = Path(data_dir), Path(out)
    setups = setups or ["single-task", *MULTITASK_SETUPS]
    unknown = [s for s in setups if s != "single-task" and s not in MULTITASK_SETUPS]
    if unknown:
        raise ValueError(f"unknown setup(s) {unknown}; known: single-task, {', '.join(MULTITASK_SETUPS)}")
    ensure_data(data_dir, n_train, n_test, seed, progress, console)
    base = base_recipe(data_dir, out, steps, seed, progress, overrides)
    tasks = ["colour", "pitch", "mix"]
    base.model.tasks = {t: TaskConfig(max_samples=mix_samples if t == "mix" else 0) for t in tasks}
    rows = {}
    for setup in setups:
        if setup == "single-task":
            row = {"score": {}, "parameters": 0, "seconds": 0.0}
            for task in tasks:
                cfg = deepcopy(base)
                cfg.model.tasks = {task: base.model.tasks[task]}
                cfg.train.out_dir = str(out / f"single-{task}")
                one = run_one(cfg, console)
                row["score"][task] = one["score"][task]
                row["parameters"] += one["parameters"]
                row["seconds"] += one["seconds"]
            rows[setup] = row
            continue
        cfg = deepcopy(base)
        spec = dict(MULTITASK_SETUPS[setup])
        for task, level in spec.pop("levels", {}).items():
            cfg.model.tasks[task].level = level
        apply_overrides(cfg, [f"{k}={v}" for k, v in spec.items()])
        cfg.train.out_dir = str(out / setup.replace(" + ", "-").replace(" @ ", "-"))
        rows[setup] = run_one(cfg, console)
    result = {"tasks": tasks, "mix_samples": mix_samples, "steps": steps, "rows": rows}
    return finish(result, out, multitask_table, console)


def multitask_table(result: dict) -> Table:
    table = Table(title=f"held-out accuracy per task (mix: {result['mix_samples']} labelled samples)")
    table.add_column("setup")
    for t in result["tasks"]:
        table.add_column(t, justify="right")
    table.add_column("params", justify="right")
    table.add_column("seconds", justify="right")
    for name, row in result["rows"].items():
        cells = [f"{row['score'][t]:.1%}" for t in result["tasks"]]
        table.add_row(name, *cells, f"{row['parameters']:,}", f"{row['seconds']:.0f}")
    return table
