"""One Trainer for every objective: the LLaVA-style LM loss, contrastive (CLIP, SigLIP, LiT, binding), data2vec and
supervised heads. The objective owns its modules, its data and what it writes; the Trainer owns the rest: AdamW,
warm-up + cosine, accumulation, clipping, autocast, progress, named-loss logging, periodic evaluation, and
checkpoints a stopped run resumes from exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from mmalign.config import ConfigError, RecipeConfig, TrainConfig, apply_overrides
from mmalign.contrastive.distributed import init_distributed
from mmalign.errors import unreadable
from mmalign.train import fsdp
from mmalign.train.optim import decay_groups, warmup_cosine

TRAINER_STATE = "trainer_state.pt"
OBJECTIVE_WEIGHTS = "objective.safetensors"
STAGING = ".saving"
COMPLETE = "COMPLETE"


def sync_file(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a power loss cannot undo what a later step relies on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        sync_file(path)
    sync_file(root)


def finish_staged(out: Path) -> None:
    """Move a complete staged save into `out`, file by file; drop an incomplete one. Idempotent: a run killed
    while moving finishes the same moves when it resumes, so `out` never keeps a mix of two saves."""
    staging = out / STAGING
    if not staging.is_dir():
        return
    if (staging / COMPLETE).is_file():
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != COMPLETE):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        sync_file(out)
    shutil.rmtree(staging, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (written by a run killed before its next save), so a resumed run's metrics read
    as one run."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each named number over ranks (every rank must pass the same names)."""
    names = sorted(values)
    total = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return dict(zip(names, total.tolist(), strict=True))


def tensorboard_writer(out: Path):
    """A TensorBoard writer under `out/tensorboard`; a clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install 'mmalign[tensorboard]'"
        ) from err
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU of this process's local rank (torchrun sets LOCAL_RANK), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()  # auto on hardware without fast bf16


def to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def run_settings(out: str | Path, overrides=(), **fields) -> TrainConfig:
    """Trainer settings for an objective's run: its defaults (`fields`), then `train.key=value` overrides, checked
    like a recipe's."""
    cfg = TrainConfig(out_dir=str(out), **fields)
    return apply_overrides(RecipeConfig(train=cfg), list(overrides)).train


def batch_generator(seed: int, cursor: int) -> torch.Generator:
    """The generator of batch number `cursor`: a resumed run draws exactly the batches the stopped one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + cursor)


class Objective(nn.Module):
    """What the Trainer optimises. Subclasses implement `batches` and `losses`; the rest has defaults.

    Losses are named, each a sum over its own count (label tokens, pairs, masked patches), so that accumulation over
    micro-batches is exact: the Trainer divides each sum by the count over the whole accumulation window.
    """

    name = "objective"
    # Whether `batches` hands each rank its own slice of a global batch (see `loop.rank_slice`); the Trainer then
    # runs the objective under DistributedDataParallel (or FSDP2). Objectives that sample per rank and gather
    # themselves leave it False.
    shards_data = False
    forward_fn = None  # set by the Trainer: the DDP-wrapped forward

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.losses(batch)

    def steps_per_epoch(self, batch_size: int) -> int | None:
        """Batches in one pass over the data; None for objectives that sample with replacement."""
        return None

    def batches(self, state: dict, cfg: TrainConfig, log: Callable[[str], None]) -> Iterator[dict]:
        """Endless micro-batches (CPU tensors) from `state["cursor"]` on; advance the cursor per batch handed out.
        Objectives that sample draw batch number `cursor` with `batch_generator(cfg.seed, cursor)`."""
        raise NotImplementedError

    def counts(self, batch: dict) -> dict[str, int]:
        """The normaliser of each named loss in this micro-batch, known before the forward pass."""
        return {self.name: len(batch["index"])}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each named loss summed over its count (see `counts`)."""
        raise NotImplementedError

    def backward(self, batch: dict, window: dict[str, int], autocast) -> dict[str, float]:
        """Accumulate gradients of sum(loss / window count) into `.grad`; return the detached sums. Objectives that
        cannot split a batch into independent parts (GradCache) override this."""
        with autocast:
            sums = (self.forward_fn or self)(batch)
        sum(value / window[name] for name, value in sums.items()).backward()
        return {name: value.item() for name, value in sums.items()}

    def optimizer_groups(self, cfg: TrainConfig) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [g for g in decay_groups(params, cfg.weight_decay) if g["params"]]

    def fsdp_module(self) -> nn.Module | None:
        """The module train.distributed=fsdp shards (it must declare `param_groups()`); None: cannot be sharded."""
        return None

    def before_optimizer_step(self) -> None:
        """E.g. average gradients over ranks."""

    def after_step(self, progress: float) -> None:
        """E.g. clamp a temperature or move an EMA teacher; progress in (0, 1]."""

    def figures(self) -> dict[str, float]:
        """Extra figures logged with the losses (e.g. multi-task loss weights)."""
        return {}

    def tables(self, optimizer_groups: list[dict]) -> list:
        """Renderables printed before training (e.g. the trainable-parameter table)."""
        return []

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{self.name}: {trainable:,} trainable parameters"

    def evaluate(self) -> dict[str, float]:
        """Held-out figures, logged at `eval_every` and at the end."""
        return {}

    # State-dict prefixes of frozen parts the objective does not own (a user's pretrained tower), left out of its
    # checkpoints: the run that built the objective loads them again.
    unsaved: tuple[str, ...] = ()

    def save(self, out: Path, step: int) -> None:
        """Everything a resumed run needs, stamped with its step."""
        path, metadata = str(out / OBJECTIVE_WEIGHTS), {"format": "pt", "step": str(step)}
        if not self.unsaved:
            save_model(self, path, metadata=metadata)  # shared (tied) tensors stored once
            return
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith(self.unsaved)}
        save_file(state, path, metadata=metadata)

    def load(self, out: Path) -> int | None:
        """Load what `save` wrote; return the stamped step."""
        path = out / OBJECTIVE_WEIGHTS
        try:
            missing, unexpected = load_model(self, str(path), strict=not self.unsaved)
            with safe_open(str(path), framework="pt") as f:
                step = (f.metadata() or {}).get("step")
        except (SafetensorError, OSError) as err:
            raise unreadable(path, err) from err
        missing = [k for k in missing if not k.startswith(self.unsaved)] if self.unsaved else []
        if missing or (self.unsaved and unexpected):
            raise ValueError(f"{path} does not fit this {self.name} run: missing {missing}, unexpected {unexpected}")
        return None if step is None else int(step)


class SampledObjective(Objective):
    """Rows of fixed tensors sampled with replacement, batch number `cursor` from its own generator; `draw` adds
    any further randomness a batch needs from the same generator."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        super().__init__()
        self.rows = rows

    def draw(self, generator: torch.Generator) -> dict:
        return {}

    def batches(self, state: dict, cfg: TrainConfig, log):
        n = len(next(iter(self.rows.values())))
        while True:
            generator = batch_generator(cfg.seed, state["cursor"])
            state["cursor"] += 1
            idx = torch.randint(n, (cfg.batch_size,), generator=generator)
            yield {"index": idx} | {k: v[idx] for k, v in self.rows.items()} | self.draw(generator)


class Trainer:
    """Optimise an objective for `cfg.max_steps` steps (or `cfg.epochs` passes); `fit()` returns a summary."""

    def __init__(self, objective: Objective, cfg: TrainConfig, console: Console | None = None, resume: bool = False):
        self.objective, self.cfg = objective, cfg
        self.console = console or Console()
        self.out = Path(cfg.out_dir)
        self.rank, self.world = init_distributed()
        self.device = pick_device(cfg.device)
        objective.to(self.device).train()
        saved = self._restore_weights() if resume else None  # full weights, before any sharding
        self.ddp, self.sharded = None, None
        if self.world > 1 and objective.shards_data and cfg.distributed == "fsdp":
            self.sharded = objective.fsdp_module()
            if self.sharded is None:
                raise ConfigError(f"train.distributed=fsdp: the {objective.name} objective cannot be sharded; use ddp")
            self.console.print(fsdp.shard_model(self.sharded))
        elif self.world > 1 and objective.shards_data:
            from torch.nn.parallel import DistributedDataParallel

            # Rank 0's weights are broadcast here; gradients are averaged in buckets during backward.
            self.ddp = DistributedDataParallel(
                objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # a batch without some modality leaves its connector unused
            )  # fmt: skip
            objective.forward_fn = lambda *args: self.ddp(*args)  # a lambda: not registered as a submodule
        per_epoch = objective.steps_per_epoch(cfg.batch_size)
        if not cfg.max_steps and per_epoch is None:
            raise ValueError(f"{objective.name} samples with replacement: set train.max_steps")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
        groups = objective.optimizer_groups(cfg)
        if not any(g["params"] for g in groups):
            raise ValueError(f"{objective.name}: no trainable parameters (train.trainable={cfg.trainable})")
        self.params = [p for g in groups for p in g["params"]]
        fused = torch.cuda.is_available() and all(p.is_cuda for p in self.params)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_ratio)
        )
        self.state = {"step": 0, "epoch": 0, "cursor": 0, "seen": 0, "skipped": 0}
        self.history: dict[str, list[float]] = {}
        if saved is not None:
            self._restore_state(saved)
        self._commit()
        self.tensorboard = tensorboard_writer(self.out) if cfg.tensorboard and self.rank == 0 else None

    # ------------------------------------------------------------------------------------------ state
    def _restore_weights(self) -> dict:
        """Load the objective's weights of the last complete save; return the trainer state saved with them."""
        if self.rank == 0:
            finish_staged(self.out)  # a save killed after it was complete is finished; one killed earlier dropped
        if self.world > 1:  # the other ranks read what rank 0 just finished moving
            torch.distributed.barrier()
        path = self.out / TRAINER_STATE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no {TRAINER_STATE} in {self.out}; nothing to resume")
        try:
            saved = torch.load(path, weights_only=True)  # tensors and plain data only: nothing in it can run code
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise unreadable(path, err) from err
        stamped = self.objective.load(self.out)
        if stamped is not None and stamped != saved["state"]["step"]:
            raise RuntimeError(
                f"{self.out}: weights are from step {stamped} but {TRAINER_STATE} from step {saved['state']['step']}"
                " (files from different saves); restart the run or restore a consistent copy"
            )
        return saved

    def _restore_state(self, saved: dict) -> None:
        """Optimizer, scheduler, data position and random states: the rest of a resumed run."""
        if self.sharded is not None:
            fsdp.load_optimizer_state(self.objective, self.optimizer, saved["optimizer"])
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = saved["state"]
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if self.rank == 0:
            truncate_log(self.out / "metrics.jsonl", self.state["step"])
        self.console.print(f"resumed {self.out} at step {self.state['step']}/{self.total_steps}")

    def _commit(self) -> None:
        """Remember the data position and RNG after the last completed step: what a crash mid-step saves, so a
        resumed run replays the interrupted step's batches instead of skipping them."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._committed = (dict(self.state), torch.get_rng_state(), cuda)

    def save(self) -> Path:
        """Objective weights and trainer state of the last completed step, as one unit: written in full to a
        staging folder, marked complete, then moved into place (see `finish_staged`). A run killed at any instant
        resumes from the last complete save."""
        if self.sharded is not None:  # collectives: every rank takes part in gathering, rank 0 writes
            optimizer = fsdp.optimizer_state(self.objective, self.optimizer)
            with fsdp.gathered(self.sharded):
                if self.rank == 0:
                    self._write(optimizer)
        elif self.rank == 0:
            self._write(self.optimizer.state_dict())
        return self.out

    def _write(self, optimizer: dict) -> None:
        state, rng, cuda_rng = self._committed
        staging = self.out / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # an incomplete save from a killed run
        staging.mkdir(parents=True)
        self.objective.save(staging, state["step"])
        trainer_state = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "state": state,
            "rng": rng,
            "cuda_rng": cuda_rng,
        }
        torch.save(trainer_state, staging / TRAINER_STATE)
        sync_tree(staging)
        (staging / f"{COMPLETE}.tmp").write_text(str(state["step"]))
        sync_file(staging / f"{COMPLETE}.tmp")
        os.replace(staging / f"{COMPLETE}.tmp", staging / COMPLETE)  # the commit point
        sync_file(staging)
        finish_staged(self.out)

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.tensorboard is not None:
                for name, value in row.items():
                    if name != "step" and isinstance(value, int | float):
                        self.tensorboard.add_scalar(name, value, row["step"])

    # ------------------------------------------------------------------------------------------ loop
    def _step(self, stream: Iterator[dict]) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns each named loss over the window."""
        micro = [next(stream) for _ in range(self.cfg.grad_accum)]
        window: dict[str, int] = {}
        for batch in micro:
            for name, n in self.objective.counts(batch).items():
                window[name] = window.get(name, 0) + n
        parallel = self.ddp is not None or self.sharded is not None
        if parallel:  # normalise by the global batch's counts; the mean of gradients over ranks undoes the factor
            window = {name: n / self.world for name, n in all_reduce_sum(window).items()}
        window = {name: max(n, 1) for name, n in window.items()}
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.device)
            last = i == len(micro) - 1
            with self._gradient_sync(last):  # gradients are averaged over ranks once per step, on the last one
                for name, value in self.objective.backward(
                    batch, window, autocast_for(self.cfg.precision, self.device)
                ).items():
                    sums[name] = sums.get(name, 0.0) + value
        if parallel:  # the logged loss is the global batch's
            sums = {name: value / self.world for name, value in all_reduce_sum(sums).items()}
        self.objective.before_optimizer_step()
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.objective.after_step(self.state["step"] / self.total_steps)
        return {name: value / window[name] for name, value in sums.items()}

    def _gradient_sync(self, last: bool):
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.sharded is not None:
            fsdp.set_gradient_sync(self.sharded, last)
        return contextlib.nullcontext()

    def _evaluate(self) -> dict[str, float]:
        self.objective.eval()
        with torch.no_grad(), autocast_for(self.cfg.precision, self.device):
            figures = self.objective.evaluate()
        self.objective.train()
        if figures:
            self._log({"step": self.state["step"], **figures})
        return figures

    def fit(self) -> dict:
        cfg = self.cfg
        finished = self.out / "summary.json"
        if self.state["step"] >= self.total_steps and finished.is_file():  # --resume on a run that had finished
            self.console.print(f"{self.out} finished at step {self.state['step']}: nothing to resume")
            return json.loads(finished.read_text())
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.console.print(f"[bold]{self.out}[/]: {self.total_steps} steps, {self.objective.describe()}")
        if self.rank == 0:
            for table in self.objective.tables(self.optimizer.param_groups):
                self.console.print(table)
        start = time.time()
        columns = [
            TextColumn(f"[bold blue]{self.objective.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        losses: dict[str, float] = {}
        try:
            with Progress(*columns, console=self.console, disable=not cfg.progress or self.rank > 0) as bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.state["step"], info="")
                stream = self.objective.batches(self.state, cfg, bar.console.print)
                while self.state["step"] < self.total_steps:
                    losses = self._step(stream)
                    self._commit()
                    step, lr = self.state["step"], self.scheduler.get_last_lr()[0]
                    for name, value in losses.items():
                        self.history.setdefault(name, []).append(value)
                    shown = " ".join(f"{n} {v:.4f}" for n, v in losses.items())
                    bar.update(task, advance=1, info=f"{shown} lr {lr:.2e}")
                    if (cfg.log_every and step % cfg.log_every == 0) or step == self.total_steps:
                        self._log(
                            {"step": step, "loss": sum(losses.values()), **losses, "lr": lr, **self.objective.figures()}
                        )
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                        self._evaluate()
                    if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                        self.save()
        except (Exception, KeyboardInterrupt) as err:
            if self.sharded is not None:  # gathering shards needs every rank, and the others may not have stopped
                self.console.print(f"[red]stopped[/] ({type(err).__name__}); resume from the last save in {self.out}")
                raise
            self.save()  # weights and optimizer are those of the last completed step, like the saved position
            self.console.print(
                f"[red]stopped at step {self._committed[0]['step']}[/] ({type(err).__name__}); "
                f"saved {self.out}, continue with --resume"
            )
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.flush()
        figures = self._evaluate()
        self.save()
        if self.tensorboard is not None:
            self.tensorboard.close()
        summary = {
            "out_dir": str(self.out),
            "steps": self.state["step"],
            "loss": sum(losses.values()) if losses else float("nan"),
            "losses": losses,
            "first_losses": {name: values[0] for name, values in self.history.items()},
            "eval": figures,
            "skipped": self.state["skipped"],
            "seconds": time.time() - start,
        }
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
