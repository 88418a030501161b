"""The Universal Projection Module's cost against the projector family's MLP on the same universal-encoder tokens.

Both map (batch, tokens, dim) features to the LLM's width: the UPM (experts + router + queries, `--queries` tokens
plus two tags out) and mlp2x_gelu (one output per input token). Reported per connector: samples/s of a training
step (forward + backward), activation memory kept for backward (the bytes autograd saves, device independent) and,
on CUDA, peak allocated memory, plus how many tokens each hands the LLM (what the LLM then pays for).

    python benchmarks/bench_upm.py [--dim 256] [--out 512] [--tokens 257] [--queries 30] [--experts 3]
                                   [--depth 1] [--batch 16] [--steps 10] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmalign.models import connectors as _connectors  # noqa: F401  (registers connectors)
from mmalign.models.upm import UniversalProjection
from mmalign.registry import CONNECTORS


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs (each storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure(name: str, step, batch: int, steps: int, device: torch.device) -> dict:
    for _ in range(2):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"name": name, "samples/s": batch / statistics.median(times), "peak MiB": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256, help="universal encoder width")
    ap.add_argument("--out", type=int, default=512, help="LLM width")
    ap.add_argument("--tokens", type=int, default=257, help="encoder tokens per input (CLIP-L/14 at 224: 257)")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--depth", type=int, default=1, help="layers per expert (OneLLM: 8)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    feats = torch.randn(args.batch, args.tokens, args.dim, device=device)
    upm = UniversalProjection(args.dim, args.out, ["image"], num_experts=args.experts, num_queries=args.queries,
                              depth=args.depth, heads=args.heads).to(device)  # fmt: skip
    mlp = CONNECTORS.build("mlp2x_gelu", in_dim=args.dim, out_dim=args.out).to(device)
    rows = []
    for name, module, run in (("upm", upm, lambda: upm("image", feats)), ("mlp2x_gelu", mlp, lambda: mlp(feats))):

        def step(run=run, module=module):
            module.zero_grad(set_to_none=True)
            run().float().pow(2).mean().backward()

        row = measure(name, step, args.batch, args.steps, device)
        row["saved MiB"] = saved_bytes(lambda run=run: run().sum()) / 2**20
        row["params"] = sum(p.numel() for p in module.parameters())
        row["LLM tokens"] = run().shape[1]
        rows.append(row)
    print(f"features: batch {args.batch} x {args.tokens} tokens x {args.dim}; LLM width {args.out}; {device}")
    print(f"{'connector':<11} {'params':>10} {'samples/s':>10} {'saved MiB':>10} {'peak MiB':>9} {'LLM tokens':>11}")
    for r in rows:
        print(f"{r['name']:<11} {r['params']:>10,} {r['samples/s']:>10.0f} {r['saved MiB']:>10.1f} "
              f"{r['peak MiB']:>9.1f} {r['LLM tokens']:>11}")  # fmt: skip
    ratio = rows[1]["samples/s"] / rows[0]["samples/s"]
    print(f"the UPM step costs {ratio:.1f}x the MLP's; it hands the LLM {rows[0]['LLM tokens']} tokens per input "
          f"instead of {rows[1]['LLM tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
