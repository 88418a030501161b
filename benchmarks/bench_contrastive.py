"""Contrastive training throughput, and what the cross-rank gather costs at 2 ranks.

    python benchmarks/bench_contrastive.py [--steps 20] [--batch 128]

1. samples/s of a LiT step on the embedded shapes setup: tiny ViT image tower (64x64, 64 tokens) + projection
   against cached text features of a locked tower (MiniLM width, 384), CLIP and SigLIP loss.
2. Two gloo processes on this machine: ms per loss forward+backward with `gather=True` (global-batch negatives)
   against `gather=False` (local negatives only), same local batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmalign.contrastive.losses import ClipLoss, SigLipLoss
from mmalign.contrastive.model import DualEncoder, PooledEncoder
from mmalign.models.encoders import clip_encoder


def throughput(loss_name: str, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = DualEncoder(PooledEncoder(clip_encoder(preset="tiny-vit")), None, text_dim=384, embed_dim=128)
    loss = ClipLoss() if loss_name == "clip" else SigLipLoss()
    opt = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=1e-3)
    pixels, text = torch.randn(batch, 3, 64, 64), torch.randn(batch, 384)

    def step():
        value = loss(model.embed_media(pixels), model.embed_text_features(text))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def _rank_main(rank: int, world: int, init: str, steps: int, batch: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(rank)
    tower = torch.nn.Linear(384, 128)
    x, y = torch.randn(batch, 384), torch.randn(batch, 384)
    times = {}
    for name, loss in (("clip", ClipLoss), ("siglip", SigLipLoss)):
        for gather in (False, True):
            fn = loss(gather=gather)
            for i in range(steps + 2):
                if i == 2:
                    dist.barrier()
                    start = time.perf_counter()
                fn(tower(x), tower(y)).backward()
            times[(name, gather)] = (time.perf_counter() - start) / steps * 1000
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def gather_cost(steps: int, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_rank_main, args=(r, 2, init, steps, batch, queue)) for r in range(2)]
        for p in procs:
            p.start()
        times = queue.get(timeout=300)
        for p in procs:
            p.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    print(f"LiT training step, batch {args.batch}, {args.steps} timed steps, torch threads {torch.get_num_threads()}")
    for name in ("clip", "siglip"):
        print(f"  {name:7} {throughput(name, args.steps, args.batch):8.1f} samples/s")
    print(f"\nloss forward+backward at 2 ranks (gloo, 1 thread each), local batch {args.batch}, embedding 128:")
    times = gather_cost(args.steps * 5, args.batch)
    for name in ("clip", "siglip"):
        local, gathered = times[(name, False)], times[(name, True)]
        print(f"  {name:7} local negatives {local:6.2f} ms   global negatives (gather) {gathered:6.2f} ms"
              f"   cost {gathered - local:+.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
