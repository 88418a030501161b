"""Fine-tuning strategies on one config: peak memory and samples/s for a frozen LLM (connector only), LoRA, DoRA,
the last LLM layers only, and full fine-tuning, without and with activation checkpointing. Each strategy runs in
its own process, so peak memory is its own.

    python benchmarks/bench_finetune.py [--steps 10] [--batch 8] [--device cpu|cuda]

The parts are set exactly as a recipe sets them (`train.trainable`, `train.finetune`): the same selectors, target
resolution, adapters and optimizer groups. The vision tower stays frozen throughout, as in LLaVA's stage 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VISION = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=112, patch_size=14
)
TEXT = dict(
    model_type="llama",
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
STRATEGIES = {
    "frozen LLM": (["connector"], "full"),
    "LoRA r=16": (["connector", "llm"], "lora"),
    "DoRA r=16": (["connector", "llm"], "dora"),
    "last 2 LLM layers": (["connector", "llm.layers[-2:]"], "full"),
    "full": (["connector", "llm"], "full"),
    "full + activation checkpointing": (["connector", "llm"], "full"),
}


def measure(name: str, steps: int, batch: int, device: str, folder: Path) -> dict:
    from mmalign.config import (
        ConnectorConfig,
        EncoderConfig,
        LLMConfig,
        LoraConfig,
        MediaConfig,
        ModelConfig,
        TrainConfig,
    )
    from mmalign.data.tokenizer import build_word_tokenizer
    from mmalign.models.adapters import inject_adapters, resolve_targets
    from mmalign.models.builder import build_model
    from mmalign.models.layers import checkpoint_stacks
    from mmalign.train.freeze import set_trainable
    from mmalign.train.optim import build_optimizer_groups

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(2000)]
    build_word_tokenizer([" ".join(words)], folder / "tok")
    image = MediaConfig(encoder=EncoderConfig(name="clip", config=VISION), connector=ConnectorConfig("mlp2x_gelu"))
    cfg = ModelConfig(media={"image": image}, llm=LLMConfig(config=TEXT, tokenizer=str(folder / "tok")))
    model, tok = build_model(cfg)
    trainable, finetune = STRATEGIES[name]
    adapted = []
    if finetune != "full":
        lora = LoraConfig(r=16, alpha=32, dropout=0.0, dora=finetune == "dora")
        lora.modules = resolve_targets(model, trainable, lora)
        inject_adapters(model, lora)
        adapted = lora.groups
    set_trainable(model, trainable, adapted)
    if "activation checkpointing" in name:
        checkpoint_stacks(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(build_optimizer_groups(model, TrainConfig(lr=1e-4, trainable=trainable)))
    n_img = model.encoders["image"].num_tokens
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, len(tok), (batch, 200), generator=g)
    ids = torch.cat([text[:, :4], torch.full((batch, n_img), model.media_token_ids["image"]), text[:, 4:]], 1)
    labels = ids.clone()
    labels[:, : 4 + n_img + 40] = -100
    batch_in = dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        labels=labels.to(device),
        media={"image": torch.randn(batch, 3, 112, 112, generator=g).to(device)},
    )
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step():
        out = model(**batch_in)
        (out["loss_sum"] / out["n_tokens"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state and allocator caches
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - built_rss
    )
    return {"strategy": name, "trainable": trained, "samples_per_s": steps * batch / seconds, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: measure one strategy, print its figures
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.one, args.steps, args.batch, args.device, Path(tmp))))
        return
    rows = []
    for name in STRATEGIES:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch)]
        out = subprocess.run([*cmd, "--device", args.device], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr)
    memory = "peak GPU MB" if args.device == "cuda" else "training RSS MB"
    print(f"device {args.device}, batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'strategy':<32} {'trainable':>12} {'samples/s':>10} {memory:>16}")
    for r in rows:
        print(f"{r['strategy']:<32} {r['trainable']:>12,} {r['samples_per_s']:>10.2f} {r['peak_mb']:>16.0f}")


if __name__ == "__main__":
    main()
