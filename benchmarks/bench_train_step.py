"""Training-step benchmark: mmalign's LLaVA model vs transformers' LlavaForConditionalGeneration.

Identical configs, weights (ours are imported from the HF model by `mmalign import`'s converter) and batches
(image + prompt + answer of varied lengths, stage-2 setup: vision tower frozen, projector + LLM trained, AdamW).
Each implementation runs in its own process so peak memory is measured separately.

    python benchmarks/bench_train_step.py [--steps 10] [--batch 8] [--vocab 32064 151936] [--device cpu|cuda]

Two vocabulary sizes by default: Llama/Vicuna's 32k (LLaVA-1.5) and Qwen2's 152k (the small LLMs of
LLaVA-OneVision-0.5B and kin), since the LM head's share of the work depends on it.
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
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
IMAGE_TOKEN = 32000


def build_reference(folder: Path, vocab: int) -> None:
    """A random HF Llava with a LLaVA-1.5-shaped config (scaled down), saved with a tokenizer-free layout."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**{**TEXT, "vocab_size": vocab}),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(folder / "hf")


def make_batches(n: int, batch: int, seed: int = 0) -> list[dict]:
    """Right-padded batches: <bos> prompt <image tokens> prompt answer; labels only on the answer."""
    g = torch.Generator().manual_seed(seed)
    n_img = (VISION["image_size"] // VISION["patch_size"]) ** 2
    out = []
    for _ in range(n):
        rows, labels = [], []
        for _ in range(batch):
            prompt = torch.randint(3, IMAGE_TOKEN, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g)
            answer = torch.randint(3, IMAGE_TOKEN, (int(torch.randint(4, 48, (1,), generator=g)),), generator=g)
            ids = torch.cat([torch.tensor([1]), prompt[:4], torch.full((n_img,), IMAGE_TOKEN), prompt[4:], answer])
            rows.append(ids)
            labels.append(torch.cat([torch.full((len(ids) - len(answer),), -100), answer]))
        length = max(len(r) for r in rows)
        ids = torch.zeros(batch, length, dtype=torch.long)
        lab = torch.full((batch, length), -100)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)], lab[i, : len(r)], mask[i, : len(r)] = r, y, 1
        pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": pixels})
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(impl: str, folder: Path, steps: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    if impl == "hf":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(folder / "hf")
        model.model.vision_tower.requires_grad_(False)

        def step(b):
            return model(**b).loss

    else:
        from mmalign.train.checkpoint import load_checkpoint
        from mmalign.train.freeze import set_trainable

        model, _, _ = load_checkpoint(folder / "ours")
        set_trainable(model, ["connector", "llm"])

        def step(b):
            b = {k: v for k, v in b.items() if k != "pixel_values"} | {"media": {"image": b["pixel_values"]}}
            out = model(**b)
            return out["loss_sum"] / out["n_tokens"]

    model.to(device).train()
    return {"impl": impl, **timed_training(model, step, make_batches(steps + 2, batch), device, lr=1e-5)}


def timed_training(model, step, batches: list[dict], device: str, lr: float) -> dict:
    """AdamW steps of `step(batch) -> loss` on the trainable parameters: two warm-up steps (allocator, optimizer
    state), then the rest timed. Throughput in samples/s, peak memory (CUDA: allocated; CPU: the process's peak
    resident size), the trainable parameter count and every loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    losses = []

    def train_step(b):
        loss = step(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for b in batches[:2]:
        train_step(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    start = time.perf_counter()
    for b in batches[2:]:
        train_step(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, whole-process peak
    samples = sum(len(b["input_ids"]) for b in batches[2:])
    return {
        "samples_per_s": samples / seconds,
        "peak_mb": peak,
        "rss_before_mb": base,
        "trainable": sum(p.numel() for p in params),
        "losses": losses,
    }


def run_children(script: str, folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Run `script --child hf` and `--child ours` in fresh processes (separate peak memory), alternating, for
    `args.rounds` rounds; their JSON results, with each one's median throughput over the rounds, its largest peak
    and the per-round figures. Alternating keeps a slow spell of a shared machine from landing on one side only."""
    runs: dict[str, list[dict]] = {"hf": [], "ours": []}
    for _ in range(args.rounds):
        for impl in runs:
            cmd = [sys.executable, script, "--child", impl, "--folder", str(folder)]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{impl} run failed:\n{done.stderr[-3000:]}")
            runs[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {}
    for impl, rounds in runs.items():
        speeds = sorted(r["samples_per_s"] for r in rounds)
        results[impl] = rounds[0] | {
            "samples_per_s": speeds[len(speeds) // 2],
            "peak_mb": max(r["peak_mb"] for r in rounds),
            "rounds": [r["samples_per_s"] for r in rounds],
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per implementation")
    ap.add_argument("--batch", type=int, default=8, help="samples per step")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32064, 151936], help="LLM vocabulary sizes to run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the median is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.folder, args.steps, args.batch, args.device)))
        return

    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(
        f"device: {args.device}, batch {args.batch}, {args.steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    for vocab in args.vocab:
        compare(vocab, args)


def compare(vocab: int, args: argparse.Namespace) -> None:
    from mmalign.interop.hf_llava import import_hf_llava

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_reference(folder, vocab)
        _write_tokenizer(folder / "hf", vocab)
        import_hf_llava(folder / "hf", folder / "ours")
        results = run_children(__file__, folder, args)
    hf, ours = results["hf"], results["ours"]
    print(
        f"\nvocabulary {vocab:,}: first-step loss transformers {hf['losses'][0]:.4f}, mmalign {ours['losses'][0]:.4f}"
    )
    print_comparison(hf, ours)


def print_comparison(hf: dict, ours: dict) -> None:
    """Throughput and peak memory of both implementations, and the ratios."""
    print(f"{'':14}{'samples/s':>12}{'peak MiB':>12}   samples/s per round")
    for name, r in (("transformers", hf), ("mmalign", ours)):
        rounds = " ".join(f"{x:.2f}" for x in r.get("rounds", []))
        print(f"{name:14}{r['samples_per_s']:>12.2f}{r['peak_mb']:>12.0f}   {rounds}")
    if len(hf.get("rounds", [])) > 1:
        ratios = " ".join(f"{o / h:.2f}x" for h, o in zip(hf["rounds"], ours["rounds"], strict=True))
        print(f"speed ratio per round: {ratios}")
    print(f"speed ratio (mmalign / transformers, medians): {ours['samples_per_s'] / hf['samples_per_s']:.2f}x")
    print(f"peak memory ratio (mmalign / transformers): {ours['peak_mb'] / hf['peak_mb']:.2f}")


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The importer needs a tokenizer whose id 32000 is <image>; a word-level one with that many entries does."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for i, tok in {0: "<unk>", 1: "<s>", 2: "</s>", IMAGE_TOKEN: "<image>", IMAGE_TOKEN + 1: "<pad>"}.items():
        del vocab[f"w{i}"]
        vocab[tok] = i
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(folder)


if __name__ == "__main__":
    main()
