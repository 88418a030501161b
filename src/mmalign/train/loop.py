"""The training loop shared by every recipe: AdamW, warm-up + cosine, clipping, accumulation, autocast, eval,
resumable checkpoints, and bad samples skipped with a count (or saved-then-raised)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from copy import deepcopy
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from mmalign.config import RecipeConfig, check_recipe
from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import Collator, ConversationDataset, epoch_order
from mmalign.data.processor import SampleError, processor_for
from mmalign.models.builder import build_model
from mmalign.train.checkpoint import TRAINER_STATE, load_weights, save_checkpoint, weights_step
from mmalign.train.freeze import count_parameters, group_of, set_trainable
from mmalign.train.optim import build_optimizer, warmup_cosine


class TooManyBadSamples(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()  # auto on hardware without fast bf16


def to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        return {k: move(x) for k, x in v.items()} if isinstance(v, dict) else v

    return {k: move(v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "media", "labels")
    return {k: batch[k] for k in keys} | {"sample_ids": batch["ids"]}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader, device: torch.device, precision: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        if not batch["ids"]:
            continue
        with autocast_for(precision, device):
            out = model(**model_inputs(to_device(batch, device)))
        total, count = total + float(out["loss_sum"]), count + out["n_tokens"]
    model.train()
    return total / max(count, 1)


class Trainer:
    """One training run of a recipe. `fit()` returns a summary dict."""

    def __init__(self, cfg: RecipeConfig, resume: bool = False, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console()
        self.out = Path(cfg.train.out_dir)
        self.resume = resume
        t = cfg.train
        check_recipe(cfg)  # build_model checks the registry names
        torch.manual_seed(t.seed)
        self.device = pick_device(t.device)
        self.model_cfg = deepcopy(cfg.model)
        if t.finetune == "lora":
            self.model_cfg.lora = deepcopy(t.lora)  # the checkpoint records the adapters it carries
        self.model, self.tokenizer = build_model(self.model_cfg)
        set_trainable(self.model, t.trainable, t.finetune)  # names that select nothing fail before any data is read
        if t.init_from:
            loaded = load_weights(self.model, t.init_from)
            # Parts that came from init_from (e.g. an LLM tuned earlier) cannot be reloaded from their `path`.
            groups = group_of(self.model)
            self.saved_groups = sorted({groups[name] for name in loaded if name in groups})
        else:
            self.saved_groups = []
        self.model.to(self.device).train()
        processor = processor_for(self.model, self.tokenizer, cfg.data)
        self.collate = Collator(self.tokenizer.pad_token_id)
        self.train_ds = ConversationDataset(cfg.data.train, cfg.data.image_folder, processor)
        self.val_loader = None
        if cfg.data.val:
            val_ds = ConversationDataset(cfg.data.val, cfg.data.image_folder, processor)
            self.val_loader = DataLoader(val_ds, batch_size=t.batch_size, collate_fn=self.collate)
        per_step = t.batch_size * t.grad_accum
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(self.train_ds) / per_step))
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, t.warmup_ratio)
        )
        self.state = {"step": 0, "epoch": 0, "cursor": 0, "seen": 0, "skipped": 0}
        if resume:
            self._restore()
        self._commit()

    # ------------------------------------------------------------------------------------------ state
    def _restore(self) -> None:
        path = self.out / TRAINER_STATE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no {TRAINER_STATE} in {self.out}; nothing to resume")
        saved = torch.load(path, weights_only=True)  # tensors and plain data only: nothing in it can run code
        stamped = weights_step(self.out)
        if stamped is not None and stamped != saved["state"]["step"]:
            raise RuntimeError(
                f"{self.out}: weights are from step {stamped} but {TRAINER_STATE} from step {saved['state']['step']}"
                " (a save was cut short); restart the run or restore a consistent copy"
            )
        load_weights(self.model, self.out)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = saved["state"]
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.console.print(f"resumed {self.out} at step {self.state['step']}/{self.total_steps}")

    def _commit(self) -> None:
        """Remember the data position and RNG after the last completed step: what a crash mid-step saves, so a
        resumed run replays the interrupted step's batches instead of skipping them."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._committed = (dict(self.state), torch.get_rng_state(), cuda)

    def save(self) -> Path:
        state, rng, cuda_rng = self._committed
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": state,
            "rng": rng,
            "cuda_rng": cuda_rng,
        }
        return save_checkpoint(
            self.out, self.model, self.tokenizer, self.model_cfg, self.cfg, trainer_state, self.saved_groups
        )

    # ------------------------------------------------------------------------------------------ data
    def batches(self):
        """Collated batches from the saved (epoch, cursor) on; the cursor counts batches handed out."""
        bs = self.cfg.train.batch_size
        while True:
            order = epoch_order(len(self.train_ds), self.cfg.train.seed, self.state["epoch"])
            chunks = [order[i : i + bs] for i in range(0, len(order), bs)][self.state["cursor"] :]
            loader = DataLoader(
                self.train_ds, batch_sampler=chunks, collate_fn=self.collate, num_workers=self.cfg.data.num_workers
            )
            for batch in loader:
                self.state["cursor"] += 1
                yield batch
            self.state["epoch"] += 1
            self.state["cursor"] = 0

    def _account(self, batch: dict, log) -> None:
        data = self.cfg.data
        self.state["seen"] += len(batch["ids"]) + len(batch["errors"])
        for err in batch["errors"]:
            self.state["skipped"] += 1
            with open(self.out / "skipped.jsonl", "a") as fh:
                fh.write(json.dumps({"id": str(err["id"]), "error": err["error"]}) + "\n")
            if data.on_error == "raise":
                raise SampleError(err["id"], err["error"].split(": ", 1)[-1])
            if self.state["skipped"] <= 5:
                log(f"[yellow]skipped[/] {err['error']}")
        fraction = self.state["skipped"] / max(self.state["seen"], 1)
        if self.state["seen"] >= 50 and fraction > data.max_skip_fraction:
            raise TooManyBadSamples(
                f"{self.state['skipped']} of {self.state['seen']} samples were bad (> data.max_skip_fraction="
                f"{data.max_skip_fraction}); see {self.out / 'skipped.jsonl'}"
            )

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        counts = count_parameters(self.model)
        self.console.print(
            f"[bold]{self.out}[/]: {self.total_steps} steps, "
            + ", ".join(f"{g} {a:,}/{b:,} trainable" for g, (a, b) in counts.items())
        )
        start, tokens, last_loss, val_loss = time.time(), 0, float("nan"), None
        columns = [
            TextColumn("[bold blue]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        stream = self.batches()
        try:
            with Progress(*columns, console=self.console, disable=not t.progress) as bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.state["step"], info="")
                while self.state["step"] < self.total_steps:
                    micro = []
                    while len(micro) < t.grad_accum:
                        batch = next(stream)
                        self._account(batch, bar.console.print)
                        if batch["ids"]:
                            micro.append(batch)
                    # Normalise by the label tokens of the whole accumulation window, so accumulation is exact.
                    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
                    loss_total = 0.0
                    for i, batch in enumerate(micro):
                        self._blank_media(batch, i)
                        batch = to_device(batch, self.device)
                        with autocast_for(t.precision, self.device):
                            out = self.model(**model_inputs(batch))
                        (out["loss_sum"] / n_tokens).backward()
                        loss_total += out["loss_sum"].item()
                        tokens += int(batch["attention_mask"].sum())
                    if t.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in self.model.parameters() if p.requires_grad], t.clip_grad
                        )
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state["step"] += 1
                    self._commit()
                    step, last_loss = self.state["step"], loss_total / n_tokens
                    lr = self.scheduler.get_last_lr()[0]
                    tps = tokens / max(time.time() - start, 1e-9)
                    bar.update(task, advance=1, info=f"loss {last_loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
                    if (t.log_every and step % t.log_every == 0) or step == self.total_steps:
                        self._log({"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tps})
                    if self.val_loader and t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                        val_loss = evaluate_loss(self.model, self.val_loader, self.device, t.precision)
                        self._log({"step": step, "val_loss": val_loss})
                    if t.save_every and step % t.save_every == 0 and step < self.total_steps:
                        self.save()
        except (Exception, KeyboardInterrupt) as err:
            self.save()  # weights and optimizer are those of the last completed step, like the saved position
            self.console.print(
                f"[red]stopped at step {self._committed[0]['step']}[/] ({type(err).__name__}); "
                f"saved {self.out}, continue with --resume"
            )
            raise
        if self.val_loader:
            val_loss = evaluate_loss(self.model, self.val_loader, self.device, t.precision)
            self._log({"step": self.state["step"], "val_loss": val_loss})
        self.save()
        summary = {
            "out_dir": str(self.out),
            "steps": self.state["step"],
            "loss": last_loss,
            "val_loss": val_loss,
            "skipped": self.state["skipped"],
            "seconds": time.time() - start,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _blank_media(self, batch: dict, micro_index: int) -> None:
        """Zero a random subset of media items of every modality; seeded by (seed, step, micro-batch), so a resumed
        run replays it."""
        p = self.cfg.data.blank_media_prob
        if p <= 0:
            return
        seed = (self.cfg.train.seed * 1_000_003 + self.state["step"]) * 64 + micro_index
        generator = torch.Generator().manual_seed(seed)
        for _, items in sorted(batch["media"].items()):
            drop = torch.rand(items.shape[0], generator=generator) < p
            items[drop] = 0.0

    def _log(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def train(cfg: RecipeConfig, resume: bool = False, console: Console | None = None) -> dict:
    return Trainer(cfg, resume=resume, console=console).fit()
