"""Training-step benchmark: mmalign's Flamingo family vs transformers' IdeficsForVisionText2Text.

Identical configs, weights (ours are imported from the IDEFICS model by `mmalign import --format hf-idefics`) and
batches (interleaved documents of 1-3 images and varied text, labels on the text after the first image). The
Flamingo setup on both sides: vision tower and LM frozen; Perceiver Resampler, cross-attention blocks and the new
token rows trained with AdamW (IDEFICS: freeze_text_layers, freeze_vision_layers, freeze_lm_head). Each
implementation runs in its own process so peak memory is measured separately.

    python benchmarks/bench_flamingo_step.py [--steps 10] [--batch 8] [--rounds 3] [--vocab 32002] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from bench_train_step import IMAGE_TOKEN, _write_tokenizer, print_comparison, run_children, timed_training

VISION = dict(embed_dim=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=112)
TEXT = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
PERCEIVER = dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=64)
MAX_IMAGES = 3


def build_reference(folder: Path, vocab: int, every: int) -> None:
    """A random IDEFICS (scaled-down IDEFICS-9B shape: a block every `every` layers), saved with a tokenizer whose
    <image> id is IDEFICS's first additional row."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(0)
    cfg = IdeficsConfig(
        vocab_size=IMAGE_TOKEN,
        additional_vocab_size=vocab - IMAGE_TOKEN,
        **TEXT,
        max_position_embeddings=1024,
        cross_layer_interval=every,
        use_resampler=True,
        vision_config={**VISION, "patch_size": 14},
        perceiver_config={**PERCEIVER, "use_resampler": True},
        freeze_text_layers=True,
        freeze_vision_layers=True,
        freeze_lm_head=True,
        pad_token_id=0,  # IDEFICS wants its padding row among the main ones; batches mask padding anyway
        bos_token_id=1,
        eos_token_id=2,
    )
    IdeficsForVisionText2Text(cfg).save_pretrained(folder / "hf")


def make_batches(n: int, batch: int, seed: int = 0) -> list[dict]:
    """Right-padded documents: <bos> text (<image> text)+ with 1-3 images; labels on text after the first image."""
    g = torch.Generator().manual_seed(seed)
    size = VISION["image_size"]
    out = []
    for _ in range(n):
        rows, counts = [], []
        for _ in range(batch):
            n_img = int(torch.randint(1, MAX_IMAGES + 1, (1,), generator=g))
            parts = [torch.tensor([1])]
            for _ in range(n_img):
                chunk = int(torch.randint(16, 56, (1,), generator=g))
                parts += [torch.tensor([IMAGE_TOKEN]), torch.randint(3, IMAGE_TOKEN, (chunk,), generator=g)]
            rows.append(torch.cat(parts))
            counts.append(n_img)
        length = max(len(r) for r in rows)
        ids = torch.full((batch, length), IMAGE_TOKEN + 1)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == IMAGE_TOKEN, -100)
        labels[(ids == IMAGE_TOKEN).long().cumsum(1) == 0] = -100  # nothing before the first image
        time_ = (ids == IMAGE_TOKEN).long().cumsum(1)  # (B, T) media time of each token
        image_mask = (time_[..., None] == torch.arange(1, MAX_IMAGES + 1)) & (mask[..., None] == 1)
        pixels = torch.zeros(batch, MAX_IMAGES, 3, size, size)
        for i, c in enumerate(counts):
            pixels[i, :c] = torch.randn(c, 3, size, size, generator=g)
        flat = torch.cat([pixels[i, :c] for i, c in enumerate(counts)])
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
             "image_attention_mask": image_mask.long(), "flat_pixels": flat}
        )  # fmt: skip
    return out


def run_one(impl: str, folder: Path, steps: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    if impl == "hf":
        from transformers import IdeficsForVisionText2Text

        model = IdeficsForVisionText2Text.from_pretrained(folder / "hf")
        # The config's freeze_* flags do not survive from_pretrained here (every tensor comes back trainable), so
        # the Flamingo setup is set by hand, as an IDEFICS user would have to.
        model.requires_grad_(False)
        for module in (model.model.perceiver_resampler, model.model.gated_cross_attn_layers):
            module.requires_grad_(True)
        model.model.embed_tokens.additional_embedding.requires_grad_(True)
        model.lm_head.additional_fc.requires_grad_(True)

        def step(b):
            # transformers' own loss views the logits with `vocab_size`, which leaves out IDEFICS's additional rows
            # and fails; the same shifted mean cross-entropy, computed here:
            labels = b["labels"]
            b = {k: v for k, v in b.items() if k not in ("flat_pixels", "labels")}
            logits = model(**b).logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    else:
        from mmalign.train.checkpoint import load_checkpoint
        from mmalign.train.freeze import set_trainable

        model, _, _ = load_checkpoint(folder / "ours")
        set_trainable(model, ["connector", "llm.xattn", "llm.new_tokens"])

        def step(b):
            keep = ("input_ids", "attention_mask", "labels")
            out = model(**{k: b[k] for k in keep}, media={"image": b["flat_pixels"]})
            return out["loss_sum"] / out["n_tokens"]

    model.to(device).train()
    return {"impl": impl, **timed_training(model, step, make_batches(steps + 2, batch), device, lr=1e-4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per implementation")
    ap.add_argument("--batch", type=int, default=8, help="documents per step")
    ap.add_argument("--vocab", type=int, default=32002, help="LLM vocabulary (IDEFICS: 32000 + 2 additional rows)")
    ap.add_argument("--every", type=int, default=1, help="a cross-attention block every n decoder layers")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the median is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.folder, args.steps, args.batch, args.device)))
        return

    import transformers

    from mmalign.interop.hf_idefics import import_hf_idefics

    transformers.utils.logging.disable_progress_bar()
    print(
        f"device: {args.device}, batch {args.batch}, {args.steps} timed steps, vocabulary {args.vocab:,}, "
        f"a block every {args.every} layer(s), torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_reference(folder, args.vocab, args.every)
        _write_tokenizer(folder / "hf", args.vocab)
        import_hf_idefics(folder / "hf", folder / "ours")
        results = run_children(__file__, folder, args)
    hf, ours = results["hf"], results["ours"]
    print(f"first-step loss transformers {hf['losses'][0]:.4f}, mmalign {ours['losses'][0]:.4f}")
    print(f"trainable parameters transformers {hf['trainable']:,}, mmalign {ours['trainable']:,}")
    print_comparison(hf, ours)


if __name__ == "__main__":
    main()
