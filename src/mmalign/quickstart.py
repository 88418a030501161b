"""`mmalign quickstart`: the whole LLaVA recipe on the embedded default, end to end, in a few CPU minutes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmalign.config import load_recipe


def _fmt(acc: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in acc.items())


def pretrain_base(
    data: str | Path,
    out: str | Path,
    *,
    vision: str = "contrastive",
    vision_steps: int | None = None,
    lm_steps: int = 200,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> None:
    """Stage 0 for the embedded default: writes out/encoder (vision tower) and out/lm (LM + tokenizer)."""
    from mmalign.contrastive.train import train_lit
    from mmalign.train.pretrain import pretrain_lm, pretrain_vision

    console = console or Console()
    data, out = Path(data), Path(out)
    if vision == "contrastive":
        lit = train_lit(data, out / "contrastive", steps=vision_steps or 600, seed=seed, console=console,
                        progress=progress)  # fmt: skip
        shutil.copytree(lit["image_encoder"], out / "encoder", dirs_exist_ok=True)
        console.print(
            f"vision tower (LiT vs the locked MiniLM text tower): held-out zero-shot {_fmt(lit['zero_shot'])}, "
            f"image-to-text R@1 {lit['retrieval']['image_to_text_R@1']:.0%}"
        )
    elif vision == "supervised":
        sup = pretrain_vision(data, out / "encoder", steps=vision_steps or 400, seed=seed, console=console,
                              progress=progress)  # fmt: skip
        console.print(f"vision tower: held-out attribute accuracy {_fmt(sup['val_accuracy'])}")
    else:
        raise ValueError(f"vision must be contrastive or supervised, got {vision!r}")
    texts = [data / "captions_train.json", data / "conversations_train.json"]
    pretrain_lm(texts, data / "tokenizer", out / "lm", steps=lm_steps, seed=seed, console=console, progress=progress)


def run_quickstart(
    out: str | Path = "runs/quickstart",
    data: str | Path = "data/shapes",
    *,
    finetune: str = "full",
    vision: str = "contrastive",
    seed: int = 0,
    n_train: int = 3000,
    vision_steps: int | None = None,
    lm_steps: int = 200,
    stage1_epochs: float | None = None,
    stage2_epochs: float | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Stage 0, 1 and 2 on the embedded shapes data, then test accuracy vs a blind baseline. The size arguments
    shrink the run (tests use them); the defaults are what the README reports."""
    from mmalign.data.processor import processor_for
    from mmalign.data.shapes import write_shapes_dataset
    from mmalign.evaluate import evaluate_vqa, majority_baseline
    from mmalign.train.checkpoint import load_checkpoint
    from mmalign.train.loop import train

    console = console or Console()
    out, data = Path(out), Path(data)
    start = time.time()
    if not (data / "qa_test.json").is_file():
        console.print(f"[bold]writing the embedded shapes dataset[/] to {data}")
        write_shapes_dataset(data, n_train=n_train, seed=seed)
    console.print("[bold]stage 0[/]: pretraining the tiny vision tower and the tiny LM on the embedded data")
    pretrain_base(data, out / "base", vision=vision, vision_steps=vision_steps, lm_steps=lm_steps, seed=seed,
                  console=console, progress=progress)  # fmt: skip
    common = [
        f"model.media.image.encoder.path={out / 'base/encoder'}",
        f"model.llm.path={out / 'base/lm'}",
        f"data.image_folder={data / 'images'}",
        f"train.seed={seed}",
        f"train.progress={str(progress).lower()}",
    ]
    console.print("[bold]stage 1[/]: feature alignment (connector only, captions)")
    stage1 = load_recipe(
        "shapes_stage1",
        common
        + [f"data.train={data / 'captions_train.json'}", f"train.out_dir={out / 'stage1'}"]
        + ([f"train.epochs={stage1_epochs}"] if stage1_epochs else []),
    )
    train(stage1, console=console)
    console.print(f"[bold]stage 2[/]: instruction tuning (connector + LLM, {finetune})")
    stage2 = load_recipe(
        "shapes_stage2",
        common
        + [
            f"data.train={data / 'conversations_train.json'}",
            f"data.val={data / 'qa_val.json'}",
            f"train.out_dir={out / 'stage2'}",
            f"train.init_from={out / 'stage1'}",
            f"train.finetune={finetune}",
        ]
        + (["train.lr=3e-3"] if finetune == "lora" else [])
        + ([f"train.epochs={stage2_epochs}"] if stage2_epochs else []),
    )
    train(stage2, console=console)
    train_seconds = time.time() - start

    model, tokenizer, _ = load_checkpoint(out / "stage2")
    processor = processor_for(model, tokenizer, stage2.data)
    test, images = data / "qa_test.json", data / "images"
    seen = evaluate_vqa(model, processor, test, images, progress=progress)
    blind = evaluate_vqa(model, processor, test, images, blind=True, progress=progress)
    majority = majority_baseline(test)
    seconds = time.time() - start

    table = Table(title="held-out test VQA accuracy (shapes, images never seen in training)")
    for col in ("question type", "n", "model", "blind (zero image)", "majority answer"):
        table.add_column(col, justify="left" if col == "question type" else "right")
    for qtype, (acc, n) in seen["by_type"].items():
        table.add_row(
            qtype, str(n), f"{acc:.1%}", f"{blind['by_type'][qtype][0]:.1%}", f"{majority['by_type'][qtype]:.1%}"
        )
    overall_majority = majority["all"]
    table.add_row(
        "all", str(seen["n"]), f"{seen['accuracy']:.1%}", f"{blind['accuracy']:.1%}", f"{overall_majority:.1%}"
    )
    console.print(table)

    # One question about one test image, so the user sees it answer.
    example = seen["predictions"][0]
    rec = next(r for r in json.loads(test.read_text()) if r["id"] == example["id"])
    question = rec["conversations"][0]["value"].replace("<image>", "").strip()
    console.print(f"[bold]example[/]: {images / rec['image']}\n  Q: {question}\n  A: {example['prediction']}")
    console.print(f"time: {seconds:.0f} s (training {train_seconds:.0f} s); checkpoint: {out / 'stage2'}")
    result = {
        "accuracy": seen["accuracy"],
        "blind_accuracy": blind["accuracy"],
        "majority_accuracy": overall_majority,
        "by_type": {
            t: {"model": a, "blind": blind["by_type"][t][0], "majority": majority["by_type"][t]}
            for t, (a, _) in seen["by_type"].items()
        },
        "seconds": seconds,
        "checkpoint": str(out / "stage2"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
