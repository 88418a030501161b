"""The `mmalign` command line. Each command is a thin, typed wrapper over a library function."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from mmalign.config import describe

app = typer.Typer(
    help="mmalign: build, align, fine-tune, evaluate and serve multimodal LLMs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()


def _add_subcommands() -> None:
    from mmalign.fusion.cli import app as classify_app

    app.add_typer(classify_app, name="classify")


_add_subcommands()


def _quiet_transformers() -> None:
    import warnings

    import transformers

    # PEFT calls a transformers API that transformers itself marks deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _config_table() -> str:
    rows = [f"[bold]{key}[/bold] = {default}  {help}" for key, default, help in describe()]
    return "Config keys (override any with key=value):\n\n" + "\n\n".join(rows)


def _message(err: Exception) -> str:
    """An exception's text without the quotes str() puts around a KeyError's message."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Folder for the models, checkpoints and results."),
    data: list[Path] = typer.Option(
        None, help="LLaVA-format training file(s); repeat for several. Default: the embedded dataset."
    ),
    eval: Path = typer.Option(None, help="Held-out LLaVA-format questions to score (with --data)."),
    image_folder: Path = typer.Option(None, help="Folder the records' image paths are relative to (with --data)."),
    val: Path = typer.Option(None, help="Validation file for stage 2's validation loss (with --data)."),
    dataset: str = typer.Option("shapes", help="Embedded dataset used without --data: shapes or glyphs."),
    finetune: str = typer.Option("full", help="Stage-2 LLM fine-tuning: full or lora (projector family)."),
    family: str = typer.Option(
        "projector",
        help="Alignment family: projector (LLaVA-style) or flamingo (Perceiver Resampler + gated cross-attention, "
        "encoder and LM frozen; writes runs/quickstart_flamingo; on the embedded shapes data it adds stage 3, "
        "in-context episodes, and a table of accuracy per number of shots) or onellm (the embedded multimodal data: "
        "image, video, audio, point cloud, depth, IMU, signal; the onellm_curriculum recipe; a table of accuracy per "
        "modality; writes runs/quickstart_onellm).",
    ),
    vision: str = typer.Option(
        "auto",
        help="Stage-0 vision pretraining: auto (lit when the data has caption-like records, else data2vec), lit "
        "(contrastive vs the locked pretrained MiniLM), caption (a small decoder writes each caption from the "
        "tower's tokens, CapPa), data2vec (self-distillation, no text), supervised (shapes attributes; embedded "
        "shapes only).",
    ),
    compare: bool = typer.Option(
        False,
        help="--family onellm: also run the same curriculum with the projector family (one encoder and MLP per "
        "modality, same data and budget) and print both side by side.",
    ),
    resume: bool = typer.Option(
        False,
        help="--family onellm: go on from a stopped run in --out: stage 0's finished parts are kept, each curriculum "
        "skips its finished stages and continues a stopped one (so --compare --resume on a finished run trains only "
        "the projector family).",
    ),
    encoder: Path = typer.Option(
        None,
        help="--family onellm: a pretrained Hugging Face CLIP or SigLIP vision tower (a folder with config.json and "
        "weights, e.g. from save_pretrained) as the universal encoder, in place of stage 0's LiT image tower.",
    ),
    overrides: list[str] = typer.Option(
        None,
        "--set",
        help="Change the recipes, key=value as `mmalign train` takes them (repeat for several). Projector and "
        "flamingo: stage1.KEY or stage2.KEY changes one stage, a bare KEY both, e.g. --set stage2.train.epochs=10. "
        "Onellm: the curriculum recipe, e.g. --set data.group_by_modality=true; --compare uses them for both families.",
    ),
    seed: int = typer.Option(0, help="Seed for data, initialisation and order."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a small multimodal model (LLaVA-style, or Flamingo-style with --family flamingo) on your data (or the
    embedded data) and show what it learned.

    Stage 0 builds a tokenizer from the data's text and pretrains a tiny vision tower (contrastively against a
    locked pretrained text tower, on the records that are one question and one answer) and a tiny LM on the text;
    stage 1 aligns the connector on those caption-like records, stage 2 instruction-tunes on the rest; then held-out
    accuracy per question type (records' `question_type`), a blind baseline (images replaced by zeros), the
    majority answer, the time taken, the checkpoint, and one answered question. The defaults are the same for every
    dataset.

    Examples: `mmalign quickstart` (embedded shapes), `mmalign quickstart --dataset glyphs`, `mmalign quickstart
    --family flamingo`, `mmalign quickstart --data captions.json --data conversations.json --eval test.json
    --image-folder images/`.
    """
    _quiet_transformers()
    from mmalign.quickstart import check_family, run_quickstart, stage_overrides

    if family == "onellm":
        from mmalign.quickstart_onellm import check_inputs, run_onellm_quickstart

        if data:
            raise typer.BadParameter("--family onellm runs on the embedded multimodal data; --data is not read")
        try:
            check_inputs(encoder, overrides)
        except (OSError, KeyError, ValueError) as err:  # the messages name the folder or the key
            raise typer.BadParameter(_message(err)) from None
        out = Path("runs/quickstart_onellm") if out == Path("runs/quickstart") else out
        run_onellm_quickstart(out, encoder=encoder, overrides=overrides, compare=compare, resume=resume, seed=seed,
                              progress=progress, console=console)  # fmt: skip
        return
    if resume:
        raise typer.BadParameter("--resume goes on from a stopped --family onellm run; use it with --family onellm")
    if encoder is not None:
        raise typer.BadParameter("--encoder sets the onellm family's universal encoder: use it with --family onellm")
    if dataset not in ("shapes", "glyphs"):
        raise typer.BadParameter(f"unknown dataset {dataset!r}; embedded: shapes, glyphs")
    try:
        check_family(family, finetune)
        stage_overrides(overrides, family)
    except (KeyError, ValueError) as err:  # the messages name the key or the choice
        raise typer.BadParameter(_message(err)) from None
    if data and image_folder is None:
        raise typer.BadParameter("--data needs --image-folder (the folder its image paths are relative to)")
    if out == Path("runs/quickstart"):  # another dataset or family does not overwrite the first run
        out = Path("_".join(["runs/quickstart", *([] if data or dataset == "shapes" else [dataset]),
                             *([] if family == "projector" else [family])]))  # fmt: skip
    run_quickstart(
        out,
        data or None,
        eval,
        image_folder,
        val_data=val,
        embedded=dataset,
        finetune=finetune,
        family=family,
        vision=vision,
        seed=seed,
        overrides=overrides,
        progress=progress,
        console=console,
    )


@app.command("data")
def data_cmd(
    out: Path = typer.Option(Path("data/shapes"), help="Folder to write images/, JSON files and tokenizer/ into."),
    n_train: int = typer.Option(3000, help="Training images (one caption and one 3-turn conversation each)."),
    n_val: int = typer.Option(100, help="Validation images (one question per type each)."),
    n_test: int = typer.Option(200, help="Test images (one question per type each)."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed; splits use disjoint streams, so test images never appear in training."),
    dataset: str = typer.Option(
        "shapes",
        help="shapes (coloured shapes, with a word-level tokenizer) or glyphs (two drawn digits on textures, six "
        "question types of 2 to 10 answers; no tokenizer: it stands in for a user's own data) or multimodal (per "
        "modality: real files, captions, 3-turn conversations and held-out questions, and one word-level tokenizer; "
        "writes data/multimodal by default) or fusion (a shapes image and a tone per record, labelled colour, pitch, "
        "mix (needs both), total (shapes + beeps, a number) and pair (colour + pitch, a retrieval key); for "
        "`mmalign classify`; writes data/fusion by default).",
    ),
    modalities: str = typer.Option(
        None, help="multimodal: comma-separated modalities to write (default: every one with a generator)."
    ),
    episodes: int = typer.Option(
        8000,
        help="shapes: in-context episodes (interleaved documents of 2-9 images whose answers all name one unstated "
        "attribute), plus the few-shot support and test files; 0 writes none.",
    ),
) -> None:
    """Write an embedded dataset to disk in LLaVA format (and, for shapes, MMC4-shaped in-context episodes)."""
    if dataset == "shapes":
        from mmalign.data.shapes import write_shapes_dataset

        paths = write_shapes_dataset(out, n_train, n_val, n_test, image_size, seed, n_episodes=episodes)
    elif dataset == "glyphs":
        from mmalign.data.glyphs import write_glyphs_dataset

        paths = write_glyphs_dataset(out, n_train, n_val, n_test, image_size, seed)
    elif dataset == "fusion":
        from mmalign.fusion.data import write_fusion_dataset

        out = Path("data/fusion") if out == Path("data/shapes") else out
        paths = write_fusion_dataset(out, n_train, n_test, seed)
    elif dataset == "multimodal":
        from mmalign.data.multimodal import write_multimodal_dataset

        out = Path("data/multimodal") if out == Path("data/shapes") else out
        names = modalities.split(",") if modalities else None
        paths = write_multimodal_dataset(out, names, n_train=n_train, n_test=n_test, seed=seed)
    else:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; embedded: shapes, glyphs, multimodal, fusion")
    console.print_json(json.dumps(paths))


@app.command()
def shard(
    source: Path = typer.Argument(..., help="LLaVA-format JSON list or JSONL to split."),
    out: Path = typer.Option(..., help="Folder to write the shards into."),
    per_shard: int = typer.Option(1000, help="Records per shard (the last may be shorter)."),
    format: str = typer.Option(
        "tar", help="tar (each shard carries its records' media: copy it anywhere) or jsonl (records only)."
    ),
    media_folder: Path = typer.Option(Path("."), help="Folder the records' media paths are relative to."),
    prefix: str = typer.Option("train", help="Shard names: PREFIX-00000.tar, PREFIX-00001.tar, ..."),
) -> None:
    """Split a dataset into shards for `data.stream=true` training (data larger than memory, read shard by
    shard). Train on them with data.train=OUT data.stream=true."""
    from mmalign.data.processor import read_records
    from mmalign.data.stream import write_shards

    try:
        paths = write_shards(read_records(source), out, per_shard, fmt=format, media_folder=media_folder, prefix=prefix)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from None
    console.print(f"wrote {len(paths)} {format} shards to {out}")


@app.command()
def pretrain(
    data: list[Path] = typer.Option(..., help="LLaVA-format training file(s); repeat for several."),
    image_folder: Path = typer.Option(..., help="Folder the records' image paths are relative to."),
    out: Path = typer.Option(Path("runs/base"), help="Writes tokenizer/, encoder/, lm/, stage1.json, stage2.json."),
    vision: str = typer.Option(
        "auto",
        help="auto (lit when there are caption-like records, else data2vec), lit, caption (captioning, CapPa), "
        "data2vec, supervised.",
    ),
    tokenizer: str = typer.Option("bpe", help="bpe (byte-level BPE trained on the data), word or wordpiece."),
    vision_steps: int = typer.Option(None, help="Optimizer steps for the vision tower (600; 400 supervised)."),
    lm_steps: int = typer.Option(200, help="Optimizer steps for the LM."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Stage 0 for any LLaVA-format dataset, exactly as the quickstart runs it.

    A tokenizer trained on the data's text, a tiny vision tower pretrained on the data's own images without labels
    (LiT against the locked MiniLM on the caption-like records, or data2vec), and a tiny LM pretrained on the text;
    saved as HF folders the recipes load (model.media.image.encoder.path=OUT/encoder, model.llm.path=OUT/lm), with
    the records split for stage 1 (OUT/stage1.json) and stage 2 (OUT/stage2.json)."""
    _quiet_transformers()
    from mmalign.quickstart import pretrain_base

    paths = pretrain_base(data, image_folder, out, vision=vision, tokenizer=tokenizer, vision_steps=vision_steps,
                          lm_steps=lm_steps, seed=seed, console=console)  # fmt: skip
    console.print_json(json.dumps({k: str(v) for k, v in paths.items() if v is not None}))


@app.command()
def contrastive(
    data: Path = typer.Option(
        Path("data/shapes"), help="A folder from `mmalign data`, or a LLaVA-format file of image-caption records."
    ),
    image_folder: Path = typer.Option(None, help="Folder the records' image paths are relative to (with a file)."),
    eval_data: Path = typer.Option(None, help="Held-out caption records for retrieval; default: 5% held out."),
    out: Path = typer.Option(Path("runs/contrastive"), help="Writes image_encoder/, heads.safetensors, results.json."),
    loss: str = typer.Option("clip", help="clip (symmetric InfoNCE) or siglip (pairwise sigmoid)."),
    steps: int = typer.Option(600, help="Optimizer steps."),
    batch_size: int = typer.Option(128, help="Pairs per batch (captions within a batch are distinct)."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warm-up + cosine)."),
    text_tower: Path = typer.Option(None, help="HF text encoder folder; default: the pretrained MiniLM package."),
    init_from: Path = typer.Option(
        None, help="Fine-tune this earlier `mmalign contrastive` output: also reports zero-shot before, and WiSE-FT."
    ),
    seed: int = typer.Option(0, help="Seed."),
    resume: bool = typer.Option(False, help="Continue a stopped run in --out from its last checkpoint."),
    overrides: list[str] = typer.Argument(
        None, help="Trainer settings as train.key=value (see `mmalign train --help`)."
    ),
) -> None:
    """LiT: a tiny image tower from scratch against a locked pretrained text tower, on image-caption pairs.

    Prints retrieval Recall@1/5/10 on held-out pairs and, on the embedded shapes data, zero-shot colour and shape
    accuracy from text prompts. The image tower it writes loads as the frozen encoder of the LLaVA recipes
    (model.media.image.encoder.path). A run of the one Trainer: train.grad_accum, train.precision,
    train.save_every, ... apply, and --resume continues it.
    """
    _quiet_transformers()
    from rich.table import Table

    from mmalign.contrastive.train import train_lit

    res = train_lit(
        data, out, image_folder=image_folder, eval_data=eval_data, loss=loss, steps=steps, batch_size=batch_size,
        lr=lr, text_tower=text_tower, init_from=init_from, seed=seed, overrides=overrides or [], resume=resume,
    )  # fmt: skip
    table = Table(title=f"held-out images, {loss} loss, locked MiniLM text tower")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for attribute, acc in res["zero_shot"].items():
        table.add_row(f"zero-shot {attribute}", f"{acc:.1%}")
        if res["zero_shot_before"]:
            table.add_row("  before fine-tuning", f"{res['zero_shot_before'][attribute]:.1%}")
            for alpha, zs in res["wise_ft"].items():
                table.add_row(f"  WiSE-FT alpha={alpha}", f"{zs[attribute]:.1%}")
    for key, value in res["retrieval"].items():
        table.add_row(key.replace("_", " "), f"{value:.1%}")
    console.print(table)
    console.print(f"image encoder: {res['image_encoder']}")


@app.command()
def bind(
    lit: Path = typer.Option(Path("runs/quickstart/base/contrastive"), help="`mmalign contrastive` output to bind to."),
    data: Path = typer.Option(
        Path("data/shapes"),
        help="The embedded shapes folder (its scenes get synthetic sounds), or a LLaVA-format file of records with "
        "an `audio` item and a paired `image` (or, lacking one, a caption as the first reply).",
    ),
    media_folder: Path = typer.Option(None, help="Folder the records' audio and image paths are relative to."),
    seconds: float = typer.Option(0.6, help="Clip length (with a file): longer clips are cropped, shorter padded."),
    out: Path = typer.Option(Path("runs/bind_audio"), help="Writes audio_encoder.safetensors and results.json."),
    steps: int = typer.Option(300, help="Optimizer steps."),
    seed: int = typer.Option(0, help="Seed."),
    resume: bool = typer.Option(False, help="Continue a stopped run in --out from its last checkpoint."),
    overrides: list[str] = typer.Argument(None, help="Trainer settings as train.key=value."),
) -> None:
    """Bind audio into a frozen image-text space (ImageBind-style).

    An audio tower learns to land next to its paired image's frozen embedding (or its caption's), then is
    classified from text prompts it never saw paired with audio (zero-shot transfer, on the embedded data).
    Prints audio-to-image (or audio-to-text) retrieval on held-out pairs: the shapes test split, or 5% of a file."""
    _quiet_transformers()
    from rich.table import Table

    from mmalign.contrastive.binding import train_binding

    res = train_binding(lit, data, out, media_folder=media_folder, seconds=seconds, steps=steps, seed=seed,
                        overrides=overrides or [], resume=resume, console=console)  # fmt: skip
    table = Table(title=f"held-out pairs: audio bound to the frozen LiT space ({res['targets']} targets)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for attribute, acc in res["audio_zero_shot_from_text"].items():
        table.add_row(f"audio zero-shot {attribute} (text prompts)", f"{acc:.1%}")
    for key, value in res[f"audio_to_{res['targets']}"].items():
        table.add_row(key.replace("_", " "), f"{value:.1%}")
    console.print(table)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_config_table(),
)
def train(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped name (shapes_stage1, shapes_stage2, ...)."),
    resume: bool = typer.Option(False, help="Continue the stopped run in train.out_dir from its last checkpoint."),
    print_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Train a recipe. Extra arguments `key=value` override any config key, e.g. `train.lr=2e-5 train.finetune=lora`.

    A recipe with `stages` is a curriculum: a table of what each stage trains and freezes is printed first, then the
    stages run in order under train.out_dir/<n>-<name>, each from the last one's weights (--resume skips finished
    stages)."""
    _quiet_transformers()
    from mmalign.config import load_recipe, save_yaml, to_dict
    from mmalign.train.loop import train as run

    cfg = load_recipe(recipe, ctx.args)
    if print_config:
        import yaml

        console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    if resume and cfg.stages:  # a single run's trainer checks its own folder; a curriculum's folder is checked here
        from mmalign.train.loop import check_resume

        check_resume(cfg, console)
    elif not resume:  # on resume the saved config is what the run started with: keep it to compare against
        save_yaml(cfg, Path(cfg.train.out_dir) / "train_config.yaml")
    if cfg.stages:
        from mmalign.train.curriculum import run_curriculum

        summaries = run_curriculum(cfg, resume=resume, console=console)
        keys = ("stage", "checkpoint", "steps", "loss")
        console.print_json(json.dumps([{k: s.get(k) for k in keys} for s in summaries]))
        return
    summary = run(cfg, resume=resume, console=console)
    console.print_json(json.dumps(summary))


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (from `mmalign train` or `mmalign import`)."),
    data: Path = typer.Option(None, help="LLaVA-format QA file; default: the checkpoint's data.val."),
    image_folder: Path = typer.Option(None, help="Image folder; default: the checkpoint's data.image_folder."),
    blind: bool = typer.Option(False, help="Replace every image with zeros (a no-vision baseline)."),
    batch_size: int = typer.Option(64, help="Questions per generation batch."),
    max_new_tokens: int = typer.Option(16, help="Longest answer."),
    limit: int = typer.Option(None, help="Only the first N questions."),
    output: Path = typer.Option(None, help="Write scores and every prediction to this JSON file."),
    shots: str = typer.Option(
        None,
        help="Few-shot in-context evaluation at these shot counts (e.g. 0,2,4,8): demonstrations from --support "
        "before each question of --data (an interleaved model, such as the Flamingo family).",
    ),
    support: Path = typer.Option(None, help="With --shots: the LLaVA-format QA file demonstrations come from."),
    select: str = typer.Option("random", help="With --shots: random | rices (most similar support images)."),
    zero_shot: str = typer.Option(
        "text-demos", help="With --shots 0: text-demos (the Flamingo paper: two demos, images dropped) | none."
    ),
) -> None:
    """VQA accuracy (standard answer normalisation) with a per-question-type table; with --shots, accuracy per
    number of in-context demonstrations."""
    _quiet_transformers()
    from rich.table import Table

    from mmalign.evaluate import evaluate_vqa, majority_baseline

    model, tokenizer, recipe = _load_for_inference(checkpoint)
    data = data or (Path(recipe.data.val) if recipe.data.val else None)
    if data is None:
        raise typer.BadParameter("no --data given and the checkpoint names no data.val")
    folder = image_folder or Path(recipe.data.image_folder)
    processor = _processor(tokenizer, model, recipe)
    if shots is not None:
        _fewshot_report(model, processor, data, folder, shots, support, select, zero_shot, limit, output)
        return
    res = evaluate_vqa(
        model, processor, data, folder, batch_size=batch_size, max_new_tokens=max_new_tokens, blind=blind, limit=limit
    )
    majority = majority_baseline(data)
    table = Table(title=f"VQA accuracy on {data}" + (" (blind)" if blind else ""))
    for col in ("question type", "n", "accuracy", "majority answer"):
        table.add_column(col)
    for qtype, (acc, n) in res["by_type"].items():
        table.add_row(qtype, str(n), f"{acc:.1%}", f"{majority['by_type'].get(qtype, float('nan')):.1%}")
    table.add_row("all", str(res["n"]), f"{res['accuracy']:.1%}", f"{majority['all']:.1%}")
    console.print(table)
    if res["skipped"]:
        console.print(f"[yellow]{len(res['skipped'])} samples skipped[/], e.g. {res['skipped'][0]}")
    if output:
        output.write_text(json.dumps(res, indent=1))


def _fewshot_report(model, processor, data, folder, shots, support, select, zero_shot, limit, output) -> None:
    from mmalign.fewshot import SELECTIONS, ZERO_SHOT, evaluate_fewshot, fewshot_table

    try:
        counts = [int(k) for k in shots.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--shots {shots!r}: give shot counts separated by commas, e.g. 0,2,4,8") from None
    if support is None:
        raise typer.BadParameter("--shots needs --support, the file demonstrations are drawn from")
    if select not in SELECTIONS or zero_shot not in ZERO_SHOT:
        raise typer.BadParameter(
            f"--select is one of {', '.join(SELECTIONS)}; --zero-shot one of {', '.join(ZERO_SHOT)}"
        )
    res = evaluate_fewshot(
        model, processor, data, support, folder, shots=counts, select=select, zero_shot=zero_shot, limit=limit
    )
    console.print(fewshot_table(res, data))
    if output:
        output.write_text(json.dumps(res, indent=1))


def _load_for_inference(checkpoint: Path):
    from mmalign.config import RecipeConfig
    from mmalign.train.checkpoint import TRAIN_CONFIG, load_checkpoint, load_train_config

    model, tokenizer, model_cfg = load_checkpoint(checkpoint)
    recipe = load_train_config(checkpoint) if (checkpoint / TRAIN_CONFIG).is_file() else RecipeConfig(model=model_cfg)
    return model, tokenizer, recipe


def _processor(tokenizer, model, recipe):
    from mmalign.data.processor import processor_for

    return processor_for(model, tokenizer, recipe.data)


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder."),
    image: list[Path] = typer.Option([], help="Image file; repeat for several images."),
    audio: list[Path] = typer.Option([], help="Audio file (WAV); repeat for several clips."),
    prompt: str = typer.Option(
        ...,
        help="The question. `<image>` (`<audio>`, ...) marks where each item goes; where absent, the items are "
        "placed before the text.",
    ),
    max_new_tokens: int = typer.Option(32, help="Longest answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Answer a prompt about one or more media items (images, audio clips)."""
    _quiet_transformers()
    from mmalign.data.processor import Conversation
    from mmalign.generate import generate as run
    from mmalign.modalities import get_modality

    model, tokenizer, recipe = _load_for_inference(checkpoint)
    processor = _processor(tokenizer, model, recipe)
    media = {m: [str(p) for p in items] for m, items in (("image", image), ("audio", audio)) if items}
    for modality, items in media.items():
        mark = get_modality(modality).placeholder
        if mark not in prompt:
            prompt = f"{mark}\n" * len(items) + prompt
    conv = Conversation(id="cli", media=media, messages=[{"role": "user", "content": prompt}])
    ids = processor.prompt_ids(conv)
    out = run(
        model,
        [ids],
        processor.media(conv),
        pad_id=tokenizer.pad_token_id,
        stop_ids=[tokenizer.eos_token_id],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )[0]
    answer = tokenizer.decode(out, skip_special_tokens=True).strip()
    console.print(answer or "[dim](empty answer: the model stopped at once)[/dim]", markup=not answer, highlight=False)


FORMATS = {
    "hf-llava": ("mmalign.interop.hf_llava", "export_hf_llava", "import_hf_llava"),
    "hf-idefics": ("mmalign.interop.hf_idefics", "export_hf_idefics", "import_hf_idefics"),
    "openflamingo": ("mmalign.interop.openflamingo", None, "import_openflamingo"),
}
FORMAT_HELP = (
    "hf-llava: transformers' LlavaForConditionalGeneration + processor (projector family) | "
    "hf-idefics: transformers' IdeficsForVisionText2Text + processor (flamingo family) | "
    "openflamingo: an OpenFlamingo checkpoint.pt (import only; needs --base)"
)


def _converter(format: str, direction: int):
    import importlib

    if format not in FORMATS:
        raise typer.BadParameter(f"unknown format {format!r}; supported: {', '.join(FORMATS)}")
    module, *names = FORMATS[format]
    if names[direction] is None:
        raise typer.BadParameter(f"format {format!r} can only be imported")
    return getattr(importlib.import_module(module), names[direction])


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder."),
    out: Path = typer.Option(..., help="Folder to write (must be new or empty, unless --overwrite)."),
    format: str = typer.Option("hf-llava", help=FORMAT_HELP),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out (only once the new folder is complete)."),
) -> None:
    """Write a checkpoint in another library's format (LoRA adapters are merged)."""
    from mmalign.folders import publish_folder

    _quiet_transformers()
    convert = _converter(format, 0)
    model, tokenizer, recipe = _load_for_inference(checkpoint)
    publish_folder(out, lambda tmp: convert(model, tokenizer, recipe.model, tmp), overwrite)
    console.print(f"wrote {out}")


@app.command("import")
def import_cmd(
    source: Path = typer.Argument(
        ...,
        help="Folder in the given format (a saved LlavaForConditionalGeneration, ...) or OpenFlamingo checkpoint.pt.",
    ),
    out: Path = typer.Option(..., help="mmalign checkpoint folder to write (new or empty, unless --overwrite)."),
    format: str = typer.Option("hf-llava", help=FORMAT_HELP),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out (only once the new folder is complete)."),
    base: str | None = typer.Option(
        None,
        help="openflamingo only: a recipe (name or YAML) whose model names the vision encoder (a CLIP folder) and the "
        "LM the checkpoint was trained on, and the heads of its resampler and blocks (model.flamingo).",
    ),
) -> None:
    """Read another library's checkpoint into an mmalign checkpoint."""
    from mmalign.folders import publish_folder

    _quiet_transformers()
    convert = _converter(format, 1)
    if format == "openflamingo":
        from mmalign.config import load_recipe

        if base is None:
            raise typer.BadParameter("an OpenFlamingo checkpoint holds no encoder or LM: name them with --base")
        model = load_recipe(base).model
        publish_folder(out, lambda tmp: convert(source, model, tmp), overwrite)
    else:
        publish_folder(out, lambda tmp: convert(source, tmp), overwrite)
    console.print(f"wrote {out}")


def main() -> None:
    """The `mmalign` command: a user's mistake prints one line saying what and where, not a traceback; `--debug`
    (or MMALIGN_DEBUG=1) lets the traceback through."""
    import os
    import sys

    debug = "--debug" in sys.argv or os.environ.get("MMALIGN_DEBUG", "") not in ("", "0")
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        message = _message(err).strip() or type(err).__name__
        console.print(f"[red]error:[/] {message}  [dim]({type(err).__name__}; --debug shows the traceback)[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
