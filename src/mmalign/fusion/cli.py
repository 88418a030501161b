"""`mmalign classify ...`: multimodal classifiers (fusion + task heads) with the same loop, configs and run folders
as everything else."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Multimodal classifiers: any encoders + a fusion module + one head per task (no LLM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


SHOWN = {"classify": ["accuracy"], "regress": ["r2", "mae"], "retrieve": ["recall@1", "map"]}


def _scores_table(title: str, specs: dict, figures: dict[str, dict[str, dict[str, float]]]) -> Table:
    """One row per input setting, a column per (task, figure): accuracy, R² and MAE, or recall@1 and mAP."""
    from mmalign.fusion.tasks import LABELS, format_score

    columns = [(t, k) for t in sorted(specs) for k in SHOWN[specs[t].kind]]
    table = Table(title=title)
    table.add_column("inputs")
    for t, k in columns:
        table.add_column(f"{t} {LABELS[k]}", justify="right")
    for name, row in figures.items():
        table.add_row(name, *(format_score(k, row[t][k]) if k in row.get(t, {}) else "-" for t, k in columns))
    return table


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: str = typer.Argument("classify_av", help="Classifier recipe YAML or shipped name (classify_av)."),
    resume: bool = typer.Option(False, help="Continue the stopped run in train.out_dir from its last checkpoint."),
) -> None:
    """Train a classifier. Extra `key=value` arguments override the recipe, e.g. `model.fusion.name=gated
    model.sharing=soft multitask.weighting=uncertainty multitask.sampling=temperature model.tasks.mix.level=2`.

    A task classifies by default; `model.tasks.<task>.kind=regress` predicts a number (R², MAE) and
    `kind=retrieve` learns an embedding in which samples with equal labels are near (recall@1, mAP).

    Keys: model.encoders.<modality>.{name,path,preset,config}, model.fusion.{name,dim,settings},
    model.trunk_depth, model.tasks.<task>.{kind,level,weight,max_samples,temperature}, model.sharing (hard | soft),
    model.soft_penalty, model.modality_dropout, multitask.{weighting,sampling,temperature,gradnorm_alpha},
    data.{train,val,folder,on_error,max_skip_fraction} and every train.* key of `mmalign train --help`.
    Prints held-out figures per task, with all modalities and with each one hidden. Under `torchrun
    --nproc_per_node N` each process takes train.batch_size samples of every global batch (DDP)."""
    from mmalign.config import resolve_recipe
    from mmalign.contrastive.distributed import rank_and_world
    from mmalign.fusion.config import load_classifier_recipe
    from mmalign.fusion.train import scores_by_inputs, train_classifier

    cfg = load_classifier_recipe(resolve_recipe(recipe), ctx.args)
    summary = train_classifier(cfg, resume=resume, console=console)
    if rank_and_world()[0] > 0:  # under torchrun, rank 0 reports
        return
    objective = summary["objective"]
    if objective.val_data is not None:
        figures = scores_by_inputs(objective.model, objective.val_data)
        console.print(_scores_table(f"held-out ({cfg.data.val})", objective.model.specs, figures))
    console.print(f"run folder: {cfg.train.out_dir} (steps {summary['steps']}, skipped {summary['skipped']})")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="A `mmalign classify train` run folder."),
    data: Path = typer.Option(None, help="Labelled JSONL/JSON records; default: the run's data.val."),
    folder: Path = typer.Option(None, help="Folder the media paths are relative to; default: the data file's."),
) -> None:
    """Held-out figures per task of a trained classifier, with all modalities and with each one hidden."""
    from mmalign.fusion.data import load_labelled
    from mmalign.fusion.train import RECIPE_FILE, load_classifier, scores_by_inputs

    model = load_classifier(run)
    if data is None:
        from mmalign.fusion.config import load_classifier_recipe

        data = load_classifier_recipe(run / RECIPE_FILE).data.val
        if not data:
            raise typer.BadParameter("the run has no data.val; give --data")
    encoders = {m: model.encoder(m) for m in model.modalities}
    labelled = load_labelled(data, encoders, model.specs, folder or "")
    for err in labelled.errors[:5]:
        console.print(f"[yellow]skipped[/] {err['error']}")
    if labelled.errors:
        console.print(f"[yellow]skipped {len(labelled.errors)} samples[/]")
    figures = scores_by_inputs(model, labelled)
    console.print(_scores_table(f"{run} on {data} ({len(labelled)} samples)", model.specs, figures))


@app.command("compare-fusion")
def compare_fusion_cmd(
    data: Path = typer.Option(Path("data/fusion"), help="Embedded image + sound data (written if missing)."),
    out: Path = typer.Option(Path("runs/fusion"), help="Writes one run per method and results.json."),
    task: str = typer.Option(
        "mix", help="mix (classify: chance 1/3), total (regress: R²) or pair (retrieve: recall@1); each needs both."
    ),
    steps: int = typer.Option(1000, help="Optimizer steps per model."),
    methods: str = typer.Option(None, help="Comma-separated fusion modules; default: all six."),
    seed: int = typer.Option(0, help="Seed."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Train every fusion module on a label that needs the image and the sound together, and the two one-modality
    baselines, and print the held-out figure, parameters and time side by side. `--task mix`: a class whose every
    value is equally likely given one input. `--task total`: shapes + beeps, a number to regress (one input alone
    explains half its variance). `--task pair`: colour + pitch as a retrieval key (nearest held-out neighbour)."""
    from mmalign.fusion.compare import compare_fusion

    names = methods.split(",") if methods else None
    compare_fusion(data, out, task=task, steps=steps, methods=names, seed=seed, progress=progress, console=console)
    console.print(f"results: {out / 'results.json'}")


@app.command("compare-multitask")
def compare_multitask_cmd(
    data: Path = typer.Option(Path("data/fusion"), help="Embedded image + sound data (written if missing)."),
    out: Path = typer.Option(Path("runs/multitask"), help="Writes one run per setup and results.json."),
    steps: int = typer.Option(600, help="Optimizer steps per model."),
    mix_samples: int = typer.Option(100, help="Labelled training samples the mix task gets (the others get all)."),
    setups: str = typer.Option(
        None,
        help="Comma-separated: single-task, hard, hard + uncertainty, hard + gradnorm, hard + pcgrad, hierarchical, "
        "soft (penalty 1), soft @ 0.01, soft @ 0.1, soft @ 10 (default: all).",
    ),
    seed: int = typer.Option(0, help="Seed."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Three tasks (colour, pitch, mix) trained alone, with hard sharing (fixed, uncertainty and GradNorm loss
    weights), hierarchically and with soft sharing; prints held-out accuracy per task side by side."""
    from mmalign.fusion.compare import compare_multitask

    names = [s.strip() for s in setups.split(",")] if setups else None
    compare_multitask(data, out, steps=steps, mix_samples=mix_samples, setups=names, seed=seed, progress=progress,
                      console=console)  # fmt: skip
    console.print(f"results: {out / 'results.json'}")
