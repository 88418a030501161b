"""`mmalign quickstart --family onellm`: the embedded multimodal data, stage 0 (tokenizer, image tower, LM), the
onellm curriculum (image first, then the other modalities with replay, then instruction tuning over all), and one
table of held-out accuracy per modality against a blind baseline and the majority answer, with image accuracy right
after the image stage beside it (what the later stages kept)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmalign.config import load_recipe
from mmalign.data.multimodal import modality_files, synthetic_modalities, write_multimodal_dataset

CURRICULUM = "onellm_curriculum"


def multimodal_data(folder: Path, n_train: int, n_test: int, seed: int, console: Console, progress: bool) -> dict:
    """The embedded multimodal files, written on first use."""
    modalities = synthetic_modalities()
    files = {m: modality_files(folder, m) for m in modalities}
    if not all(p.is_file() for f in files.values() for p in f.values()) or not (folder / "tokenizer").is_dir():
        console.print(f"[bold]writing the embedded multimodal data[/] ({', '.join(modalities)}) to {folder}")
        write_multimodal_dataset(folder, modalities, n_train=n_train, n_test=n_test, seed=seed, progress=progress)
    return files


def check_inputs(encoder: str | Path | None, overrides: list[str] | None, recipe: str = CURRICULUM):
    """What a user hands the run, checked before anything trains: `encoder` must be a CLIP or SigLIP tower folder
    (FileNotFoundError, ValueError) and `overrides` must be keys and values the recipe takes (KeyError,
    ConfigError). Returns the recipe with the overrides."""
    from mmalign.models.encoders import tower_family

    if encoder is not None:
        tower_family(encoder)
    return load_recipe(recipe, overrides or [])


def stage0(folder: Path, files: dict, out: Path, *, vision_steps: int, lm_steps: int, bind_steps: int, seed: int,
           console, progress, encoder: Path | None = None, settings: dict[str, dict] | None = None,
           resume: bool = False):  # fmt: skip
    """The universal encoder's start (`encoder`, a pretrained CLIP or SigLIP tower, or else an image tower aligned
    by LiT to the locked MiniLM on the image captions), every other modality's tokenizer bound to text through that
    frozen tower (built with `settings[modality]`, the curriculum's tokenizer settings, so the curriculum can load
    it), and a tiny LM pretrained on every modality's text, with the data's word-level tokenizer. With `resume`,
    each part a stopped run finished is kept (its weights are written last) and a stopped run of the Trainer goes
    on from its checkpoint."""
    from mmalign.contrastive.tokenizers import bind_tokenizers
    from mmalign.contrastive.train import train_lit
    from mmalign.models.encoders import tower_family
    from mmalign.train.pretrain import pretrain_lm

    kept = []
    if encoder is None and resume and (out / "encoder" / "model.safetensors").is_file():
        encoder = out / "encoder"
        kept.append("the image tower")
    elif encoder is None:
        lit = train_lit(files["image"]["captions"], out / "contrastive", image_folder=folder, steps=vision_steps,
                        seed=seed, resume=resume, console=console, progress=progress)  # fmt: skip
        encoder = out / "encoder"
        shutil.copytree(lit["image_encoder"], encoder, dirs_exist_ok=True)
        recall = lit["retrieval"]["image_to_text_R@1"]
        console.print(f"image tower (LiT, {lit['pairs']} pairs): held-out image-to-text R@1 {recall:.0%}")
    else:
        console.print(f"image tower: the {tower_family(encoder)} tower at {encoder} (no LiT)")
    others = {m: f["captions"] for m, f in files.items() if m != "image"}
    bound = [m for m in others if resume and (out / "tokenizers" / f"{m}.safetensors").is_file()]
    kept += [f"the {m} tokenizer" for m in bound]
    others = {m: path for m, path in others.items() if m not in bound}
    if others:
        bind_tokenizers(encoder, others, folder, out / "tokenizers", steps=bind_steps, seed=seed, settings=settings,
                        resume=resume, console=console, progress=progress)  # fmt: skip
    if resume and (out / "lm" / "model.safetensors").is_file():
        kept.append("the LM")
    else:
        texts = [f[k] for f in files.values() for k in ("captions", "conversations")]
        lm = pretrain_lm(texts, folder / "tokenizer", out / "lm", steps=lm_steps, seed=seed, console=console,
                         progress=progress)  # fmt: skip
        console.print(f"LM: loss {lm['first_loss']:.2f} -> {lm['last_loss']:.2f}")
    if kept:
        console.print(f"kept from the stopped run in {out}: {', '.join(kept)}")
    return {"encoder": Path(encoder), "lm": out / "lm", "tokenizers": out / "tokenizers"}


def curriculum_recipe(recipe: str, folder: Path, base: dict, out: Path, seed: int, progress: bool, epochs=None,
                      overrides: list[str] | None = None):  # fmt: skip
    """The shipped curriculum pointed at this run's data, stage-0 parts and output folder, then `overrides`
    (key=value, as `mmalign train` takes them)."""
    from mmalign.models.encoders import tower_family

    family = tower_family(base["encoder"])
    cfg = load_recipe(
        recipe,
        [
            f"model.llm.path={base['lm']}",
            f"model.onellm.encoder.name={family}",
            f"model.onellm.encoder.path={base['encoder']}",
            f"model.onellm.encoder.keep_cls={str(family == 'clip').lower()}",  # a SigLIP tower has no CLS token
            f"model.onellm.tokenizers={base['tokenizers']}",
            f"data.image_folder={folder}",
            f"train.out_dir={out}",
            f"train.seed={seed}",
            f"train.progress={str(progress).lower()}",
            *(overrides or []),
        ],
    )
    for stage in cfg.stages:
        stage.data = [str(folder / Path(f).name) for f in stage.data]
        stage.epochs = epochs or stage.epochs
    return cfg


def projector_twin(cfg, encoder: Path, out: Path):
    """The same curriculum for the projector family: per modality its own encoder (image: the stage-0 tower,
    frozen; the others: their tokenizer plus a small transformer, trained from scratch where the onellm family
    trains that modality's tokenizer) and its own MLP connector; same data, stages, epochs and learning rates."""
    import copy

    from mmalign.config import ConnectorConfig, EncoderConfig, MediaConfig

    twin = copy.deepcopy(cfg)
    twin.model.family = "projector"
    image = EncoderConfig(name=cfg.model.onellm.encoder.name, path=str(encoder), feature_layer=-2)

    def fresh(m: str) -> EncoderConfig:  # the same tokenizer settings (the point clouds' normals) on both sides
        config = {"dim": 64, "depth": 2, "heads": 4, "tokenizer": dict(cfg.model.media[m].tokenizer)}
        return EncoderConfig(name="modality-transformer", config=config)

    twin.model.media = {
        m: MediaConfig(
            encoder=image if m == "image" else fresh(m),
            connector=ConnectorConfig("mlp2x_gelu"),
        )
        for m in cfg.model.media
    }
    twin.train.out_dir = str(out)
    # A slower rate for the onellm tokenizers keeps their stage-0 binding; the twin's encoders start random.
    twin.train.group_lr = {g: lr for g, lr in cfg.train.group_lr.items() if g.split(".")[0] != "tokenizer"}
    for stage in twin.stages:
        groups = []
        for g in stage.trainable:
            if g == "tokenizer":  # every modality's tokenizer -> every trainable (non-image) encoder
                groups += [f"encoder.{m}" for m in cfg.model.media if m != "image"]
            elif g.startswith("tokenizer."):
                groups += [] if g == "tokenizer.image" else ["encoder." + g.split(".", 1)[1]]
            else:
                groups.append(g)
        stage.trainable = groups
    return twin


def evaluate_modalities(checkpoint: Path, data_cfg, files: dict, folder: Path, *, modalities, limit, progress):
    """{modality: {model, blind, majority, n, by_type}} on each modality's held-out questions."""
    from mmalign.data.processor import processor_for
    from mmalign.evaluate import evaluate_vqa, majority_baseline
    from mmalign.train.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(checkpoint)
    processor = processor_for(model, tokenizer, data_cfg)
    out = {}
    for m in modalities:
        test = files[m]["test"]
        seen = evaluate_vqa(model, processor, test, folder, limit=limit, progress=progress)
        blind = evaluate_vqa(model, processor, test, folder, blind=True, limit=limit, progress=progress)
        out[m] = {
            "model": seen["accuracy"],
            "blind": blind["accuracy"],
            "majority": majority_baseline(test)["all"],
            "n": seen["n"],
            "by_type": {t: a for t, (a, _) in seen["by_type"].items()},
        }
    return out


def side_by_side(onellm: dict, projector: dict, params: dict[str, int]) -> Table:
    """Held-out accuracy per modality for both families, the winner, and the parameters each family trained."""
    table = Table(title="the same curriculum, data and budget: onellm vs projector family (held-out accuracy)")
    for col in ("modality", "onellm", "projector", "wins"):
        table.add_column(col, justify="left" if col in ("modality", "wins") else "right")
    for m in onellm:
        a, b = onellm[m]["model"], projector[m]["model"]
        table.add_row(m, f"{a:.1%}", f"{b:.1%}", "onellm" if a > b else "projector" if b > a else "tie")
    table.add_row("trained params", f"{params['onellm']:,}", f"{params['projector']:,}", "")
    return table


def trained_parameters(checkpoint: Path, stages: list) -> int:
    """Parameters any stage of a curriculum trained, counted once."""
    from mmalign.train.checkpoint import load_checkpoint
    from mmalign.train.freeze import count_parameters, select_groups

    model, _, _ = load_checkpoint(checkpoint)
    sizes = {g: total for g, (_, total) in count_parameters(model).items()}
    trained = {g for s in stages for g in select_groups(model, s.trainable)}
    return sum(sizes[g] for g in trained)


def accuracy_table(final: dict, image_stage: float | None, title: str) -> Table:
    table = Table(title=title)
    for col in ("modality", "n", "model", "blind (zeroed input)", "majority answer", "per question type"):
        table.add_column(col, justify="left" if col in ("modality", "per question type") else "right")
    for m, r in final.items():
        kept = f" (after the image stage: {image_stage:.1%})" if m == "image" and image_stage is not None else ""
        table.add_row(
            m,
            str(r["n"]),
            f"{r['model']:.1%}{kept}",
            f"{r['blind']:.1%}",
            f"{r['majority']:.1%}",
            ", ".join(f"{t} {a:.0%}" for t, a in r["by_type"].items()),
        )
    return table


def run_onellm_quickstart(
    out: str | Path = "runs/quickstart_onellm",
    data_dir: str | Path = "data/multimodal",
    *,
    recipe: str = CURRICULUM,
    n_train: int = 2000,
    n_test: int = 100,
    vision_steps: int = 600,
    lm_steps: int = 400,
    bind_steps: int = 1000,
    encoder: str | Path | None = None,
    overrides: list[str] | None = None,
    epochs: float | None = None,
    limit: int | None = None,
    compare: bool = False,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Data, stage 0, the curriculum, and the per-modality table; `encoder` (a Hugging Face CLIP or SigLIP vision
    tower's folder) replaces stage 0's LiT tower as the universal encoder; `overrides` (key=value) change the
    curriculum recipe, for both families; with `compare`, the same curriculum for the
    projector family on the same stage 0, and a side-by-side table. With `resume`, what a stopped run in `out`
    finished is kept (stage 0's parts, each curriculum's finished stages) and the rest goes on from its checkpoint:
    `compare` and `resume` on a finished run train only the projector family. The size arguments shrink the run
    (tests use them); the defaults are what the README reports."""
    from mmalign.train.curriculum import run_curriculum

    console = console or Console()
    out, folder = Path(out), Path(data_dir)
    start = time.time()
    recipe_cfg = check_inputs(encoder, overrides, recipe)  # a bad tower or override fails now, not after stage 0
    settings = {m: dict(media.tokenizer) for m, media in recipe_cfg.model.media.items()}
    files = multimodal_data(folder, n_train, n_test, seed, console, progress)
    console.print("[bold]stage 0[/]: the image tower that becomes the universal encoder, each other modality's "
                  "tokenizer bound to text through it, and the LM")  # fmt: skip
    base = stage0(folder, files, out / "base", vision_steps=vision_steps, lm_steps=lm_steps, bind_steps=bind_steps,
                  seed=seed, console=console, progress=progress, encoder=encoder and Path(encoder),
                  settings=settings, resume=resume)  # fmt: skip
    cfg = curriculum_recipe(recipe, folder, base, out / "curriculum", seed, progress, epochs, overrides)
    summaries = run_curriculum(cfg, resume=resume, console=console)
    train_seconds = time.time() - start
    modalities = [m for m in cfg.model.media if m in files]
    first = Path(summaries[0]["checkpoint"])
    image_stage = None
    if "image" in modalities:
        early = evaluate_modalities(first, cfg.data, files, folder, modalities=["image"], limit=limit,
                                    progress=progress)  # fmt: skip
        image_stage = early["image"]["model"]
    final_checkpoint = Path(summaries[-1]["checkpoint"])
    final = evaluate_modalities(final_checkpoint, cfg.data, files, folder, modalities=modalities, limit=limit,
                                progress=progress)  # fmt: skip
    title = f"held-out accuracy per modality after the {len(cfg.stages)}-stage curriculum (inputs never seen before)"
    console.print(accuracy_table(final, image_stage, title))
    result = {
        "checkpoint": str(final_checkpoint),
        "stages": [s["checkpoint"] for s in summaries],
        "modalities": final,
        "image_after_image_stage": image_stage,
        "train_seconds": train_seconds,
        "seconds": time.time() - start,
    }
    if compare:
        console.print("[bold]the projector family[/] on the same curriculum (one encoder and MLP per modality)")
        twin = projector_twin(cfg, base["encoder"], out / "projector")
        twin_summaries = run_curriculum(twin, resume=resume, console=console)
        twin_final = Path(twin_summaries[-1]["checkpoint"])
        other = evaluate_modalities(twin_final, twin.data, files, folder, modalities=modalities, limit=limit,
                                    progress=progress)  # fmt: skip
        params = {"onellm": trained_parameters(final_checkpoint, cfg.stages),
                  "projector": trained_parameters(twin_final, twin.stages)}  # fmt: skip
        console.print(side_by_side(final, other, params))
        result["projector"] = {"checkpoint": str(twin_final), "modalities": other, "trained_params": params}
    result["seconds"] = time.time() - start
    console.print(f"time: {result['seconds']:.0f} s (training {train_seconds:.0f} s); checkpoint: {final_checkpoint}")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
