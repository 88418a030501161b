"""`mmalign pretrain` and `mmalign quickstart`: stage 0 and the whole LLaVA recipe on any LLaVA-format data (the
embedded shapes data when none is given), with one set of defaults for every dataset."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmalign.config import load_recipe
from mmalign.data.processor import read_records

VISION_CHOICES = ("auto", "lit", "caption", "data2vec", "supervised")


# The shipped recipes each family's quickstart runs (stage 1, stage 2).
RECIPES = {
    "projector": ("shapes_stage1", "shapes_stage2"),
    "flamingo": ("flamingo_shapes_stage1", "flamingo_shapes_stage2"),
}
FEWSHOT_RECIPE = "flamingo_shapes_fewshot"  # the flamingo family's stage 3, on data with in-context episodes
FEWSHOT_SHOTS = (0, 1, 2, 4, 8)


def stage_overrides(overrides: list[str] | None, family: str = "projector") -> tuple[list[str], list[str]]:
    """`key=value` changes for stage 1 and stage 2: `stage1.` or `stage2.` before a key picks one stage, a bare key
    changes both. Each stage's recipe must take its keys (KeyError, ConfigError otherwise), so a typo stops the
    run before stage 0."""
    stages: tuple[list[str], list[str]] = ([], [])
    for item in overrides or []:
        for i, prefix in enumerate(("stage1.", "stage2.")):
            if item.startswith(prefix):
                stages[i].append(item[len(prefix) :])
                break
        else:
            stages[0].append(item)
            stages[1].append(item)
    for recipe, changes in zip(RECIPES[family], stages, strict=True):
        load_recipe(recipe, changes)
    return stages


def check_family(family: str, finetune: str) -> None:
    """A family the quickstart has recipes for, and a fine-tuning choice that family can take."""
    if family not in RECIPES:
        raise ValueError(f"quickstart family {family!r}: choose {' or '.join(RECIPES)}")
    if family == "flamingo" and finetune != "full":
        raise ValueError("the flamingo family keeps the LM frozen in both stages; --finetune applies to projector")


def _fmt(acc: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in acc.items())


def _is_caption(record: dict) -> bool:
    """One question and one answer: a caption-like record, what stage 1 and contrastive pretraining read."""
    return isinstance(record, dict) and len(record.get("conversations") or []) == 2


def split_stages(files: list[Path], out: Path) -> dict[str, Path | None]:
    """Write out/stage1.json (caption-like records) and out/stage2.json (longer conversations; every record when
    there are none). A dataset without caption-like records aligns on all of its records in stage 1 too."""
    records = [rec for path in files for rec in read_records(path)]
    captions = [r for r in records if _is_caption(r)]
    conversations = [r for r in records if not _is_caption(r)] or records
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage1.json").write_text(json.dumps(captions or records))
    (out / "stage2.json").write_text(json.dumps(conversations))
    return {
        "stage1": out / "stage1.json",
        "stage2": out / "stage2.json",
        "captions": out / "stage1.json" if captions else None,
    }


def pretrain_base(
    data: list[str | Path],
    image_folder: str | Path,
    out: str | Path,
    *,
    vision: str = "auto",
    tokenizer: str = "bpe",
    lit_data: str | Path | None = None,
    vision_steps: int | None = None,
    lm_steps: int = 200,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Stage 0 for LLaVA-format `data` files (media paths relative to `image_folder`). Writes out/tokenizer (trained
    on the data's text), out/encoder (the vision tower: LiT against the locked MiniLM on the caption-like records,
    or data2vec on the images when there are none) and out/lm (a tiny LM pretrained on the data's text), plus
    out/stage1.json and out/stage2.json for the recipes. `lit_data`: a folder from `mmalign data` whose scenes
    give LiT one canonical caption per image and a zero-shot report (the embedded demo). Returns those paths."""
    from mmalign.contrastive.train import train_lit
    from mmalign.data.tokenizer import build_data_tokenizer
    from mmalign.train.pretrain import lm_corpus, pretrain_lm

    if vision not in VISION_CHOICES:
        raise ValueError(f"vision must be one of {', '.join(VISION_CHOICES)}; got {vision!r}")
    console = console or Console()
    data, out, folder = [Path(p) for p in data], Path(out), Path(image_folder)
    stages = split_stages(data, out)
    texts = [m["content"] for conv in lm_corpus(data) for m in conv]
    if vision == "auto":
        vision = "lit" if stages["captions"] else "data2vec"
    if vision in ("lit", "caption") and stages["captions"] is None:
        raise ValueError(f"vision={vision} needs caption-like records (one question, one answer); try data2vec")
    text_tokenizer = build_data_tokenizer(texts, out / "tokenizer", kind=tokenizer)
    if vision == "lit":
        lit = train_lit(lit_data or stages["captions"], out / "contrastive", image_folder=folder,
                        steps=vision_steps or 600, seed=seed, console=console, progress=progress)  # fmt: skip
        shutil.copytree(lit["image_encoder"], out / "encoder", dirs_exist_ok=True)
        zero_shot = f"zero-shot {_fmt(lit['zero_shot'])}, " if lit["zero_shot"] else ""
        console.print(
            f"vision tower (LiT vs the locked MiniLM text tower, {lit['pairs']} pairs): held-out {zero_shot}"
            f"image-to-text R@1 {lit['retrieval']['image_to_text_R@1']:.0%}"
        )
    elif vision == "caption":
        from mmalign.contrastive.captioning import train_captioner

        cap = train_captioner(stages["captions"], folder, text_tokenizer, out / "captioning",
                              steps=vision_steps or 600, seed=seed, console=console, progress=progress)  # fmt: skip
        shutil.copytree(cap["image_encoder"], out / "encoder", dirs_exist_ok=True)
        console.print(
            f"vision tower (captioning {cap['pairs']} pairs): held-out caption loss {cap['held_out_loss']:.2f}, "
            f"{cap['blank_image_loss']:.2f} with a blank image"
        )
    elif vision == "data2vec":
        _pretrain_data2vec(data, folder, out / "encoder", vision_steps or 600, seed, console, progress)
    else:
        from mmalign.train.pretrain import pretrain_vision

        sup = pretrain_vision(folder.parent, out / "encoder", steps=vision_steps or 400, seed=seed, console=console,
                              progress=progress)  # fmt: skip
        console.print(f"vision tower: held-out attribute accuracy {_fmt(sup['val_accuracy'])}")
    lm = pretrain_lm(data, out / "tokenizer", out / "lm", steps=lm_steps, seed=seed, console=console,
                     progress=progress)  # fmt: skip
    console.print(f"LM: {len(texts)} turns of text, loss {lm['first_loss']:.2f} -> {lm['last_loss']:.2f}")
    return stages | {"encoder": out / "encoder", "lm": out / "lm", "tokenizer": out / "tokenizer"}


def _pretrain_data2vec(data, folder, out, steps, seed, console, progress) -> None:
    from mmalign.contrastive.data2vec import train_data2vec
    from mmalign.data.pairs import read_pairs
    from mmalign.models.encoders import clip_encoder, save_encoder

    encoder = clip_encoder(preset="tiny-vit")
    pairs = read_pairs(data, folder, encoder)
    losses = train_data2vec(encoder, pairs.media, steps=steps, lr=2e-3, seed=seed, out_dir=out.parent / "data2vec",
                            top_k=4, ema_start=0.99, ema_end=0.999, progress=progress, console=console)  # fmt: skip
    save_encoder(encoder, out)
    console.print(f"vision tower (data2vec, {len(pairs.ids)} images): loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def embedded_data(
    name: str, folder: Path, n_train: int, seed: int, console: Console, n_episodes: int = 8000
) -> dict[str, Path]:
    """The files of an embedded dataset, written on first use (shapes: with its in-context episodes, added to a
    folder written before they existed)."""
    from mmalign.data.glyphs import write_glyphs_dataset
    from mmalign.data.shapes import fewshot_files, write_fewshot, write_shapes_dataset

    if not (folder / "qa_test.json").is_file():
        console.print(f"[bold]writing the embedded {name} dataset[/] to {folder}")
        if name == "shapes":
            write_shapes_dataset(folder, n_train=n_train, seed=seed, n_episodes=n_episodes)
        else:
            write_glyphs_dataset(folder, n_train=n_train, seed=seed)
    files = {
        "data": [folder / "captions_train.json", folder / "conversations_train.json"],
        "eval": folder / "qa_test.json",
        "val": folder / "qa_val.json",
        "image_folder": folder / "images",
    }
    if name == "shapes" and n_episodes:
        episodes = fewshot_files(folder)
        if not all(p.is_file() for p in episodes.values()):
            write_fewshot(folder, n_docs=n_episodes, seed=seed)
        files |= episodes
    return files


def run_quickstart(
    out: str | Path = "runs/quickstart",
    data: list[str | Path] | None = None,
    eval_data: str | Path | None = None,
    image_folder: str | Path | None = None,
    *,
    val_data: str | Path | None = None,
    embedded: str = "shapes",
    embedded_dir: str | Path | None = None,
    finetune: str = "full",
    family: str = "projector",
    vision: str = "auto",
    seed: int = 0,
    n_train: int = 3000,
    vision_steps: int | None = None,
    lm_steps: int = 200,
    stage1_epochs: float | None = None,
    stage2_epochs: float | None = None,
    n_episodes: int = 8000,
    fewshot_epochs: float | None = None,
    fewshot_limit: int | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Stage 0, 1 and 2 on `data` (LLaVA-format files, media under `image_folder`), then accuracy on `eval_data`
    against a blind baseline and the majority answer. Without `data`, the embedded dataset `embedded` (written to
    `embedded_dir`, default data/<name>). The size arguments shrink the run (tests use them); the defaults are what
    the README reports, the same for every dataset. `overrides` change the stage recipes (see stage_overrides).
    `family`: projector (LLaVA) or flamingo (its shipped recipes, encoder and LM frozen in both stages); on the
    embedded shapes data the flamingo family goes on to stage 3, in context (see fewshot_stage)."""
    from mmalign.train.loop import train

    check_family(family, finetune)
    stage1_changes, stage2_changes = stage_overrides(overrides, family)

    console = console or Console()
    out = Path(out)
    start = time.time()
    name, lit_data, files = embedded, None, {}
    if data is None:
        folder = Path(embedded_dir or f"data/{embedded}")
        files = embedded_data(embedded, folder, n_train, seed, console, n_episodes)
        data, eval_data, val_data, image_folder = files["data"], files["eval"], files["val"], files["image_folder"]
        lit_data = folder if embedded == "shapes" else None
    else:
        name = Path(data[0]).resolve().parent.name
        if image_folder is None:
            raise ValueError("--image-folder is needed with --data: the folder the records' image paths are in")
    image_folder = Path(image_folder)
    console.print("[bold]stage 0[/]: a tokenizer, the tiny vision tower and the tiny LM, from the training data")
    base = pretrain_base(data, image_folder, out / "base", vision=vision, lit_data=lit_data, vision_steps=vision_steps,
                         lm_steps=lm_steps, seed=seed, console=console, progress=progress)  # fmt: skip
    common = [
        f"model.media.image.encoder.path={base['encoder']}",
        f"model.llm.path={base['lm']}",
        f"data.image_folder={image_folder}",
        f"train.seed={seed}",
        f"train.progress={str(progress).lower()}",
    ]
    stage1_recipe, stage2_recipe = RECIPES[family]
    trained = "connector" if family == "projector" else "resampler, cross-attention, new token rows"
    console.print(f"[bold]stage 1[/]: feature alignment ({trained}; caption-like records)")
    stage1 = load_recipe(
        stage1_recipe,
        common
        + [f"data.train={base['stage1']}", f"train.out_dir={out / 'stage1'}"]
        + ([f"train.epochs={stage1_epochs}"] if stage1_epochs else [])
        + stage1_changes,
    )
    train(stage1, console=console)
    what = f"connector + LLM, {finetune}" if family == "projector" else f"{trained}; LM frozen"
    console.print(f"[bold]stage 2[/]: instruction tuning ({what})")
    # The projector family's stage 2 goes on reading the caption-like records beside the conversations: every
    # caption is one more example of what each image shows and where, and glyphs' LM needed those (README).
    stage2_data = [base["stage2"]] + ([base["captions"]] if family == "projector" and base["captions"] else [])
    stage2 = load_recipe(
        stage2_recipe,
        common
        + [
            f"data.train={json.dumps([str(p) for p in stage2_data])}",
            f"data.val={val_data}" if val_data else "data.val=null",
            f"train.out_dir={out / 'stage2'}",
            f"train.init_from={out / 'stage1'}",
        ]
        + ([f"train.finetune={finetune}"] if family == "projector" else [])
        + (["train.lr=3e-3"] if finetune == "lora" else [])
        + ([f"train.epochs={stage2_epochs}"] if stage2_epochs else [])
        + stage2_changes,
    )
    train(stage2, console=console)
    train_seconds = time.time() - start
    result = {"checkpoint": str(out / "stage2"), "train_seconds": train_seconds}
    if eval_data is not None:
        result |= held_out_table(out / "stage2", stage2.data, Path(eval_data), image_folder, name, progress, console)
    if family == "flamingo" and "interleaved" in files:
        stage3 = load_recipe(
            FEWSHOT_RECIPE,
            common
            + ["data.val=null", f"train.out_dir={out / 'fewshot'}", f"train.init_from={out / 'stage2'}"]
            + ([f"train.epochs={fewshot_epochs}"] if fewshot_epochs else []),
        )
        stage3.data.train = [str(base["stage2"]), str(files["interleaved"])]  # a list: not an override's text
        result["fewshot"] = fewshot_stage(stage3, files, fewshot_limit, progress, console)
    result["seconds"] = time.time() - start
    stage3 = f", in context: {result['fewshot']['checkpoint']}" if "fewshot" in result else ""
    console.print(
        f"time: {result['seconds']:.0f} s (stages 0-2 {train_seconds:.0f} s); checkpoint: {out / 'stage2'}{stage3}"
    )
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def fewshot_stage(cfg, files: dict, limit: int | None, progress: bool, console: Console) -> dict:
    """Stage 3 of the flamingo family: the stage-2 model goes on over its conversations mixed with in-context
    episodes (`cfg`, the FEWSHOT_RECIPE), then accuracy per shot count on held-out images, where only the
    demonstrations say which attribute to name (0 shots: the bare query), and held-out VQA again, to show the
    stage kept it."""
    from mmalign.data.processor import processor_for
    from mmalign.evaluate import evaluate_vqa
    from mmalign.fewshot import evaluate_fewshot, fewshot_table
    from mmalign.train.checkpoint import load_checkpoint
    from mmalign.train.loop import train

    console.print("[bold]stage 3[/]: in context (the same parts train, on conversations + episodes; LM frozen)")
    train(cfg, console=console)
    model, tokenizer, _ = load_checkpoint(cfg.train.out_dir)
    processor = processor_for(model, tokenizer, cfg.data)
    folder = files["image_folder"]
    res = evaluate_fewshot(model, processor, files["fewshot_test"], files["support"], folder, shots=FEWSHOT_SHOTS,
                           zero_shot="none", limit=limit, progress=progress)  # fmt: skip
    console.print(fewshot_table(res, files["fewshot_test"]))
    vqa = evaluate_vqa(model, processor, files["eval"], folder, progress=progress)
    console.print(f"held-out VQA after stage 3: {vqa['accuracy']:.1%}; checkpoint: {cfg.train.out_dir}")
    return {
        "checkpoint": str(cfg.train.out_dir),
        "shots": {k: r["accuracy"] for k, r in res["shots"].items()},
        "by_type": {k: r["by_type"] for k, r in res["shots"].items()},
        "zero_shot": res["zero_shot"],
        "vqa_accuracy": vqa["accuracy"],
    }


def held_out_table(checkpoint, data_cfg, test: Path, images: Path, name: str, progress: bool, console) -> dict:
    """Accuracy per question type on `test`, with the blind (zeroed media) and majority-answer baselines; prints a
    table and one answered question."""
    from mmalign.data.processor import processor_for
    from mmalign.evaluate import evaluate_vqa, majority_baseline
    from mmalign.train.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(checkpoint)
    processor = processor_for(model, tokenizer, data_cfg)
    seen = evaluate_vqa(model, processor, test, images, progress=progress)
    blind = evaluate_vqa(model, processor, test, images, blind=True, progress=progress)
    majority = majority_baseline(test)
    table = Table(title=f"held-out test VQA accuracy ({name}, images never seen in training)")
    for col in ("question type", "n", "model", "blind (zero image)", "majority answer"):
        table.add_column(col, justify="left" if col == "question type" else "right")
    for qtype, (acc, n) in seen["by_type"].items():
        table.add_row(
            qtype, str(n), f"{acc:.1%}", f"{blind['by_type'][qtype][0]:.1%}", f"{majority['by_type'][qtype]:.1%}"
        )
    table.add_row(
        "all", str(seen["n"]), f"{seen['accuracy']:.1%}", f"{blind['accuracy']:.1%}", f"{majority['all']:.1%}"
    )
    console.print(table)
    example = seen["predictions"][0]  # one question about one test image, so the user sees it answer
    rec = next(r for r in read_records(test) if r["id"] == example["id"])
    question = rec["conversations"][0]["value"].replace("<image>", "").strip()
    console.print(f"[bold]example[/]: {images / rec['image']}\n  Q: {question}\n  A: {example['prediction']}")
    return {
        "accuracy": seen["accuracy"],
        "blind_accuracy": blind["accuracy"],
        "majority_accuracy": majority["all"],
        "by_type": {
            t: {"model": a, "blind": blind["by_type"][t][0], "majority": majority["by_type"][t]}
            for t, (a, _) in seen["by_type"].items()
        },
    }
