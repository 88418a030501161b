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


def _accuracy_table(title: str, figures: dict[str, dict[str, float]]) -> Table:
    tasks = sorted({t for row in figures.values() for t in row})
    table = Table(title=title)
    table.add_column("inputs")
    for t in tasks:
        table.add_column(t, justify="right")
    for name, row in figures.items():
        table.add_row(name, *(f"{row[t]:.1%}" if t in row else "-" for t in tasks))
    return table


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: str = typer.Argument("classify_av", help="Classifier recipe YAML or shipped name (classify_av)."),
    resume: bool = typer.Option(False, help="Continue the stopped run in train.out_dir from its last checkpoint."),
) -> None:
    """Train a classifier. Extra `key=value` arguments override the recipe, e.g. `model.fusion.name=gated
    model.sharing=soft multitask.weighting=uncertainty multitask.sampling=temperature model.tasks.mix.level=2`.

    Keys: model.encoders.<modality>.{name,path,preset,config}, model.fusion.{name,dim,settings},
    model.trunk_depth, model.tasks.<task>.{level,weight,max_samples}, model.sharing (hard | soft),
    model.soft_penalty, model.modality_dropout, multitask.{weighting,sampling,temperature,gradnorm_alpha},
    data.{train,val,folder,on_error,max_skip_fraction} and every train.* key of `mmalign train --help`.
    Prints held-out accuracy per task, with all modalities and with each one hidden. Under `torchrun
    --nproc_per_node N` each process takes train.batch_size samples of every global batch (DDP)."""
    from mmalign.config import resolve_recipe
    from mmalign.contrastive.distributed import rank_and_world
    from mmalign.fusion.config import load_classifier_recipe
    from mmalign.fusion.train import accuracy_by_inputs, held_out, train_classifier

    cfg = load_classifier_recipe(resolve_recipe(recipe), ctx.args)
    summary = train_classifier(cfg, resume=resume, console=console)
    if rank_and_world()[0] > 0:  # under torchrun, rank 0 reports
        return
    objective = summary["objective"]
    if objective.val_data is not None:
        figures = accuracy_by_inputs(objective.model, objective.val_data, held_out(summary))
        console.print(_accuracy_table(f"held-out accuracy ({cfg.data.val})", figures))
    console.print(f"run folder: {cfg.train.out_dir} (steps {summary['steps']}, skipped {summary['skipped']})")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="A `mmalign classify train` run folder."),
    data: Path = typer.Option(None, help="Labelled JSONL/JSON records; default: the run's data.val."),
    folder: Path = typer.Option(None, help="Folder the media paths are relative to; default: the data file's."),
) -> None:
    """Held-out accuracy per task of a trained classifier, with all modalities and with each one hidden."""
    from mmalign.fusion.data import load_labelled
    from mmalign.fusion.train import RECIPE_FILE, accuracy_by_inputs, load_classifier

    model = load_classifier(run)
    if data is None:
        from mmalign.fusion.config import load_classifier_recipe

        data = load_classifier_recipe(run / RECIPE_FILE).data.val
        if not data:
            raise typer.BadParameter("the run has no data.val; give --data")
    encoders = {m: model.encoder(m) for m in model.modalities}
    labelled = load_labelled(data, encoders, model.classes, folder or "")
    for err in labelled.errors[:5]:
        console.print(f"[yellow]skipped[/] {err['error']}")
    if labelled.errors:
        console.print(f"[yellow]skipped {len(labelled.errors)} samples[/]")
    figures = accuracy_by_inputs(model, labelled)
    console.print(_accuracy_table(f"{run} on {data} ({len(labelled)} samples)", figures))


@app.command("compare-fusion")
def compare_fusion_cmd(
    data: Path = typer.Option(Path("data/fusion"), help="Embedded image + sound data (written if missing)."),
    out: Path = typer.Option(Path("runs/fusion"), help="Writes one run per method and results.json."),
    steps: int = typer.Option(1000, help="Optimizer steps per model."),
    methods: str = typer.Option(None, help="Comma-separated fusion modules; default: all six."),
    seed: int = typer.Option(0, help="Seed."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Train every fusion module on `mix` (a label that needs the image and the sound together) and the two
    one-modality baselines, and print held-out accuracy, parameters and time side by side."""
    from mmalign.fusion.compare import compare_fusion

    names = methods.split(",") if methods else None
    compare_fusion(data, out, steps=steps, methods=names, seed=seed, progress=progress, console=console)
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
