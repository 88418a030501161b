"""The LLaVA-style recipe as an objective of the Trainer: next-token loss on the answers of conversations with media,
bad samples skipped with a count (or saved-then-raised), validation loss, checkpoints that describe themselves."""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from mmalign.config import RecipeConfig, check_recipe, load_yaml, resume_changes
from mmalign.constants import IGNORE_INDEX
from mmalign.contrastive.distributed import rank_and_world
from mmalign.data.dataset import Collator, ConversationDataset, epoch_order
from mmalign.data.grouping import PackedCollator, length_grouped_batches
from mmalign.data.processor import SampleError, processor_for
from mmalign.data.stream import close_shard, count_records, open_shard, record_order, shard_order, shard_paths
from mmalign.models.adapters import inject_adapters, merge_adapters, resolve_targets
from mmalign.models.builder import build_model
from mmalign.models.layers import checkpoint_stacks
from mmalign.train.checkpoint import (
    MODEL_CONFIG,
    TRAIN_CONFIG,
    load_weights,
    read_model_config,
    save_checkpoint,
    weights_step,
)
from mmalign.train.freeze import count_parameters, group_of, module_patterns, set_trainable, trainable_table
from mmalign.train.optim import build_optimizer_groups
from mmalign.train.trainer import Objective, Trainer, batch_generator, to_device


class TooManyBadSamples(RuntimeError):
    pass


def rank_slice(chunk: list[int], order: list[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's slice of a global batch; a short last batch is filled from the epoch's start, so every rank
    steps with samples."""
    if world == 1:
        return chunk
    chunk = chunk + order[: batch_size * world - len(chunk)]
    return chunk[rank * batch_size : (rank + 1) * batch_size]


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "media", "labels")
    inputs = {k: batch[k] for k in keys} | {"sample_ids": batch["ids"]}
    if "position_ids" in batch:  # packed rows: restarting positions, not a padding mask, keep samples apart
        inputs |= {"attention_mask": None, "position_ids": batch["position_ids"]}
    return inputs


class LMObjective(Objective):
    """Next-token prediction on the answer tokens, for a model built from a recipe's `model` section."""

    name = "lm"
    shards_data = True

    def __init__(self, cfg: RecipeConfig):
        super().__init__()
        t = cfg.train
        check_recipe(cfg)  # build_model checks the registry names
        self.cfg = cfg
        self.out = Path(t.out_dir)
        self.model_cfg = deepcopy(cfg.model)
        if t.finetune == "qlora":
            self.model_cfg.llm.quantize = "nf4"
        self.model, self.tokenizer = build_model(self.model_cfg)
        self.saved_groups = []
        if t.init_from:
            self._init_from(t.init_from)
        if t.finetune != "full":  # the checkpoint records the adapters it carries, by full module name
            lora = replace(t.lora, dora=t.finetune == "dora")
            self.model_cfg.lora = replace(lora, modules=resolve_targets(self.model, t.trainable, lora))
            inject_adapters(self.model, self.model_cfg.lora)
        # names that select nothing fail here, before any data is read
        set_trainable(self.model, t.trainable, t.lora.groups if t.finetune != "full" else ())
        if t.activation_checkpointing:
            checkpoint_stacks(self.model)
        self.processor = processor = processor_for(self.model, self.tokenizer, cfg.data)
        pad = self.tokenizer.pad_token_id
        self.collate = Collator(pad)
        self.train_collate = PackedCollator(pad, cfg.data.pack_length) if cfg.data.pack_length else self.collate
        self.shards, self.train_ds = None, None
        if cfg.data.stream:  # read shard by shard as training goes; only their sizes now
            self.shards = shard_paths(cfg.data.train)
            self.shard_sizes = [count_records([path]) for path in self.shards]
        else:
            self.train_ds = ConversationDataset(
                cfg.data.train, cfg.data.image_folder, processor, cfg.data.train_fractions, t.seed
            )
        self.val_loader = None
        if cfg.data.val:
            val_ds = ConversationDataset(cfg.data.val, cfg.data.image_folder, processor)
            self.val_loader = DataLoader(val_ds, batch_size=t.batch_size, collate_fn=self.collate)

    def _init_from(self, path: str) -> None:
        """Weights of an earlier stage, whatever its strategy: adapters it trained are merged into their base
        layers first, so this stage may train the same parts another way (full after LoRA, LoRA after full)."""
        earlier = read_model_config(path) if (Path(path) / MODEL_CONFIG).is_file() else None
        if earlier is not None and earlier.lora is not None:
            inject_adapters(self.model, earlier.lora)
        loaded = load_weights(self.model, path)
        # Parts that came from init_from (e.g. an LLM tuned earlier) cannot be reloaded from their `path`.
        groups = group_of(self.model)
        self.saved_groups = sorted({groups[name] for name in loaded if name in groups})
        merge_adapters(self.model)

    # ------------------------------------------------------------------------------------------ data
    def steps_per_epoch(self, batch_size: int) -> int:
        size = batch_size * rank_and_world()[1]
        if self.shards is not None:
            return sum(-(-n // size) for n in self.shard_sizes)
        return len(self.epoch_batches(self.train_ds, 0))

    def batches(self, state: dict, cfg, log):
        """Collated batches from the saved position on: (epoch, cursor), plus the shard position when streaming.
        The cursor counts (global) batches handed out. Under torchrun each rank takes its slice of every global
        batch of batch_size * world samples, so N ranks see what one process with an N times larger batch would.
        Batches whose samples all failed are accounted for and passed over."""
        state.setdefault("shard", 0)
        while True:
            if self.shards is None:
                yield from self._pass(self.train_ds, self.epoch_batches(self.train_ds, state["epoch"]), state, log)
            else:
                yield from self._stream(state, log)
            state["epoch"] += 1
            state["cursor"] = 0

    def _stream(self, state: dict, log):
        """One epoch over the shards in their seeded order, one shard in memory (and on scratch disk) at a time."""
        order = shard_order(len(self.shards), self.cfg.train.seed, state["epoch"])
        scratch = self.out / ".stream" / f"rank{rank_and_world()[0]}"
        while state["shard"] < len(order):
            k = order[state["shard"]]
            shard = open_shard(self.shards[k], scratch, Path(self.cfg.data.image_folder))
            try:
                source = str(shard.path)
                ds = ConversationDataset.from_records(shard.records, shard.media_folder, self.processor, source)
                yield from self._pass(ds, self.epoch_batches(ds, state["epoch"], shard=k), state, log)
            finally:
                close_shard(shard)
            state["shard"] += 1
            state["cursor"] = 0
        state["shard"] = 0

    def _pass(self, ds: ConversationDataset, batches: list[list[int]], state: dict, log):
        """The batches of `ds` from the cursor on, each rank its slice."""
        bs, seed = self.cfg.train.batch_size, self.cfg.train.seed
        rank, world = rank_and_world()
        order = [i for batch in batches for i in batch]
        chunks = [rank_slice(batch, order, bs, rank, world) for batch in batches]
        loader = DataLoader(
            ds,
            batch_sampler=chunks[state["cursor"] :],
            collate_fn=self.train_collate,
            num_workers=self.cfg.data.num_workers,
        )
        for batch in loader:
            state["cursor"] += 1
            self._account(batch, state, log)
            if batch["ids"]:
                key = state["epoch"] * 1_000_003 + state["shard"] * 10_007 + state["cursor"]
                self._blank_media(batch, batch_generator(seed, key))
                yield batch
            elif world > 1:  # the other ranks would wait for this one's gradients forever
                raise TooManyBadSamples(f"rank {rank}: every sample of batch {state['cursor']} was bad")

    def epoch_batches(self, ds: ConversationDataset, epoch: int, shard: int | None = None) -> list[list[int]]:
        """Global batches of sample indices of `ds` for one epoch (of one shard): a pure function of the seed,
        epoch and shard, so resume replays it."""
        cfg = self.cfg.train
        size = cfg.batch_size * rank_and_world()[1]
        data = self.cfg.data
        if data.group_by_length or data.group_by_modality:
            lengths, groups = ds.lengths()
            if not data.group_by_length:  # equal lengths: the sort is stable, so each group keeps its shuffled order
                lengths = [0] * len(lengths)
            seed = cfg.seed if shard is None else cfg.seed * 1_000_003 + shard
            return length_grouped_batches(lengths, size, seed, epoch, groups)
        if shard is None:
            order = epoch_order(len(ds), cfg.seed, epoch)
        else:
            order = record_order(len(ds), cfg.seed, epoch, shard)
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _account(self, batch: dict, state: dict, log) -> None:
        data = self.cfg.data
        state["seen"] += len(batch["ids"]) + len(batch["errors"])
        for err in batch["errors"]:
            state["skipped"] += 1
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "skipped.jsonl", "a") as fh:
                fh.write(json.dumps({"id": str(err["id"]), "error": err["error"]}) + "\n")
            if data.on_error == "raise":  # the message names the sample once, and its shard (if any) after it
                source, _, problem = err["error"].partition(f"sample {err['id']}: ")
                raise SampleError(err["id"], f"{problem} (in {source.removesuffix(': ')})" if source else problem)
            if state["skipped"] <= 5:
                log(f"[yellow]skipped[/] {err['error']}")
        fraction = state["skipped"] / max(state["seen"], 1)
        if state["seen"] >= 50 and fraction > data.max_skip_fraction:
            raise TooManyBadSamples(
                f"{state['skipped']} of {state['seen']} samples were bad (> data.max_skip_fraction="
                f"{data.max_skip_fraction}); see {self.out / 'skipped.jsonl'}"
            )

    def _blank_media(self, batch: dict, generator: torch.Generator) -> None:
        """Zero a random subset of media items of every modality (seeded per batch, so a resumed run replays it)."""
        p = self.cfg.data.blank_media_prob
        if p <= 0:
            return
        for _, items in sorted(batch["media"].items()):
            drop = torch.rand(items.shape[0], generator=generator) < p
            items[drop] = 0.0

    # ------------------------------------------------------------------------------------------ loss
    def counts(self, batch: dict) -> dict[str, int]:
        return {self.name: int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return {self.name: self.model(**model_inputs(batch))["loss_sum"]}

    def fsdp_module(self):
        return self.model

    def optimizer_groups(self, cfg) -> list[dict]:
        return build_optimizer_groups(self.model, cfg)

    def describe(self) -> str:
        counts = count_parameters(self.model)
        text = ", ".join(f"{g} {a:,}/{b:,} trainable" for g, (a, b) in counts.items())
        lora = self.model_cfg.lora
        if lora is not None:
            kind = self.cfg.train.finetune
            text += f"\n{kind} adapters on {len(lora.modules)} modules: " + ", ".join(module_patterns(lora.modules))
        return text

    def tables(self, optimizer_groups: list[dict]) -> list:
        return [trainable_table(self.model, optimizer_groups)]

    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        device = next(self.model.parameters()).device
        total, count = 0.0, 0
        for batch in self.val_loader:
            if batch["ids"]:
                out = self.model(**model_inputs(to_device(batch, device)))
                total, count = total + float(out["loss_sum"]), count + out["n_tokens"]
        return {"val_loss": total / max(count, 1)}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, out: Path, step: int) -> None:
        save_checkpoint(out, self.model, self.tokenizer, self.model_cfg, self.cfg, step, self.saved_groups)

    def load(self, out: Path) -> int | None:
        load_weights(self.model, out)
        return weights_step(out)


def check_resume(cfg: RecipeConfig, console: Console) -> None:
    """A resumed run continues the run it started as: only logging and evaluation settings may change."""
    saved = Path(cfg.train.out_dir) / TRAIN_CONFIG
    if saved.is_file():
        for line in resume_changes(load_yaml(saved), cfg):
            console.print(f"resume: {line}")


def recipe_trainer(cfg: RecipeConfig, resume: bool = False, console: Console | None = None) -> Trainer:
    console = console or Console()
    if resume:
        check_resume(cfg, console)
    torch.manual_seed(cfg.train.seed)
    return Trainer(LMObjective(cfg), cfg.train, console=console, resume=resume)


def train(cfg: RecipeConfig, resume: bool = False, console: Console | None = None) -> dict:
    summary = recipe_trainer(cfg, resume=resume, console=console).fit()
    return summary | {"val_loss": summary["eval"].get("val_loss")}
