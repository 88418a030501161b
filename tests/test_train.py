"""The training loop on tiny models: loss falls, checkpoints hold the right weights, resume is exact,
accumulation is exact, bad samples are counted or stop the run with a checkpoint, LoRA reloads identically."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from helpers import stopped_at
from mmalign.config import (
    ConnectorConfig,
    DataConfig,
    EncoderConfig,
    LLMConfig,
    LoraConfig,
    MediaConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
)
from mmalign.data.dataset import epoch_order
from mmalign.data.processor import SampleError
from mmalign.models.multimodal import MultimodalLM
from mmalign.train.checkpoint import load_checkpoint
from mmalign.train.loop import recipe_trainer, train


def recipe(base, shapes, tmp_path, **train_kw) -> RecipeConfig:
    data_kw = train_kw.pop("data", {})
    return RecipeConfig(
        model=ModelConfig(
            media={
                "image": MediaConfig(
                    encoder=EncoderConfig(path=str(base / "encoder")), connector=ConnectorConfig(name="mlp2x_gelu")
                )
            },
            llm=LLMConfig(path=str(base / "lm")),
        ),
        data=DataConfig(
            **{"train": shapes["conversations"], "image_folder": shapes["images"], "template": "chat", **data_kw}
        ),
        train=TrainConfig(
            **{"out_dir": str(tmp_path / "run"), "batch_size": 8, "lr": 3e-3, "progress": False, "log_every": 1,
               "trainable": ["connector", "llm"], "warmup_ratio": 0.0, **train_kw}
        ),
    )  # fmt: skip


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_stage2_loss_falls_and_checkpoint_reloads(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=30, lr=1e-2, data={"val": shapes["val"]})
    summary = train(cfg)
    run = tmp_path / "run"
    curve = losses(run)
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    assert summary["val_loss"] is not None and summary["skipped"] == 0
    for name in ("model.safetensors", "model_config.yaml", "train_config.yaml", "tokenizer/tokenizer.json"):
        assert (run / name).is_file()
    # Encoder came from a path and stayed frozen: not in the checkpoint. Connector and LLM are.
    keys = load_file(run / "model.safetensors").keys()
    assert not any(k.startswith("encoders.") for k in keys)
    assert any(k.startswith("llm.") for k in keys) and any(k.startswith("connectors.") for k in keys)
    model, _, _ = load_checkpoint(run)
    saved = load_file(run / "model.safetensors")
    for name, p in model.named_parameters():
        if name in saved:
            torch.testing.assert_close(p.detach(), saved[name])
    fresh = recipe_trainer(cfg).objective.model  # the same build before training: loading must have changed the weights
    assert not torch.equal(model.connectors["image"].linears[0].weight, fresh.connectors["image"].linears[0].weight)


def test_stage1_checkpoint_is_only_the_connector(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=2, trainable=["connector"])
    cfg.data.train, cfg.data.template = shapes["captions"], "plain"
    train(cfg)
    keys = load_file(tmp_path / "run" / "model.safetensors").keys()
    assert keys and all(k.startswith("connectors.") for k in keys)


def test_resume_after_interrupt_equals_an_uninterrupted_run(base, shapes, tmp_path):
    straight = recipe(base, shapes, tmp_path / "a", max_steps=6)
    train(straight)

    interrupted = recipe(base, shapes, tmp_path / "b", max_steps=6)
    with stopped_at(3):
        train(interrupted)
    assert torch.load(tmp_path / "b/run/trainer_state.pt", weights_only=False)["state"]["step"] == 3
    train(interrupted, resume=True)

    a, b = load_file(tmp_path / "a/run/model.safetensors"), load_file(tmp_path / "b/run/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gradient_accumulation_is_exact(base, shapes, tmp_path):
    one = recipe(base, shapes, tmp_path / "one", max_steps=1, batch_size=8, grad_accum=1)
    two = recipe(base, shapes, tmp_path / "two", max_steps=1, batch_size=4, grad_accum=2)
    train(one)
    train(two)
    a, b = load_file(tmp_path / "one/run/model.safetensors"), load_file(tmp_path / "two/run/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def _window_gradients(cfg) -> dict[str, torch.Tensor]:
    """The gradients the first optimizer step of `cfg` would apply (captured instead of stepping)."""
    trainer = recipe_trainer(cfg)
    grads = {}

    def capture():
        for name, p in trainer.objective.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.clone()

    trainer.optimizer.step, trainer.scheduler.step = capture, lambda: None
    trainer._step(trainer.objective.batches(trainer.state, cfg.train, print))
    return grads


def test_accumulated_gradients_equal_the_full_batch_with_answers_of_different_lengths(base, shapes, tmp_path):
    """Each micro-batch's loss is a sum over its answer tokens, divided by the tokens of the whole window: with
    answers of 1 to 8 words, averaging per micro-batch (or per sample) would give different gradients."""
    records = json.loads(open(shapes["conversations"]).read())[:8]
    for k, rec in enumerate(records):
        answer = rec["conversations"][1]["value"]
        rec["conversations"] = rec["conversations"][:2]
        rec["conversations"][1]["value"] = " ".join([answer] * (k + 1))
    data = tmp_path / "lengths.json"
    data.write_text(json.dumps(records))
    kw = dict(max_steps=1, clip_grad=0.0, data={"train": str(data)})  # clipping would hide the gradients' scale
    one = recipe(base, shapes, tmp_path / "one", batch_size=8, **kw)
    two = recipe(base, shapes, tmp_path / "two", batch_size=4, grad_accum=2, **kw)
    a, b = _window_gradients(one), _window_gradients(two)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=1e-5)


def _with_bad_records(shapes, tmp_path, positions):
    records = json.loads(open(shapes["conversations"]).read())[:16]
    bad = [
        {"id": "missing-image", "image": "nope.png", "conversations": records[0]["conversations"]},
        {"id": "empty-conversation", "image": records[0]["image"], "conversations": []},
    ]
    for pos, rec in zip(positions, bad, strict=False):
        records[pos] = rec
    path = tmp_path / "with_bad.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_bad_samples_are_skipped_and_counted(base, shapes, tmp_path):
    data = _with_bad_records(shapes, tmp_path, [3, 9])
    cfg = recipe(base, shapes, tmp_path, max_steps=4, batch_size=4, data={"train": data, "max_skip_fraction": 0.5})
    summary = train(cfg)
    assert summary["skipped"] == 2 and summary["steps"] == 4
    skipped = [json.loads(line) for line in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == {"missing-image", "empty-conversation"}
    assert "image file not found" in " ".join(s["error"] for s in skipped)


def test_on_error_raise_stops_with_a_checkpoint(base, shapes, tmp_path):
    order = epoch_order(16, 0, 0)
    data = _with_bad_records(shapes, tmp_path, [order[5]])  # in the second batch of 4
    cfg = recipe(base, shapes, tmp_path, max_steps=4, batch_size=4, data={"train": data, "on_error": "raise"})
    with pytest.raises(SampleError, match="missing-image: image file not found"):
        train(cfg)
    state = torch.load(tmp_path / "run/trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 1 and state["state"]["cursor"] == 1  # the failing batch is not consumed
    # Resumable: after deciding to skip bad samples, the run picks up at step 1 and finishes.
    cfg.data.on_error = "skip"
    cfg.data.max_skip_fraction = 0.5
    summary = train(cfg, resume=True)
    assert summary["steps"] == 4 and summary["skipped"] == 1


def test_crash_mid_step_resumes_at_the_interrupted_step(base, shapes, tmp_path, monkeypatch):
    """A failure inside a step (here: the third forward) saves the last completed step, not a half-consumed one."""
    straight = recipe(base, shapes, tmp_path / "a", max_steps=4, batch_size=4)
    train(straight)
    crashing = recipe(base, shapes, tmp_path / "b", max_steps=4, batch_size=4)
    calls = {"n": 0}
    original = MultimodalLM.forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out-of-memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultimodalLM, "forward", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        train(crashing)
    monkeypatch.setattr(MultimodalLM, "forward", original)
    state = torch.load(tmp_path / "b/run/trainer_state.pt", weights_only=False)["state"]
    assert state["step"] == 2 and state["cursor"] == 2
    train(crashing, resume=True)
    a, b = load_file(tmp_path / "a/run/model.safetensors"), load_file(tmp_path / "b/run/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_lora_trains_only_adapters_and_reloads_identically(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=3, finetune="lora", lora=LoraConfig(r=4, alpha=8))
    trainer = recipe_trainer(cfg)
    model = trainer.objective.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("connectors.") for n in trainable)
    assert not any("lora" in n for n, _ in model.encoders["image"].named_parameters())
    trainer.fit()
    reloaded, tok, _ = load_checkpoint(tmp_path / "run")
    ids = torch.tensor(
        [[2, 6] + [reloaded.media_token_ids["image"]] * reloaded.encoders["image"].num_tokens + [10, 11, 7]]
    )
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids, media={"image": pixels})["logits"], model(ids, media={"image": pixels})["logits"]
        )


def test_resume_refuses_weights_and_state_from_different_steps(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=2)
    train(cfg)
    state_file = tmp_path / "run/trainer_state.pt"
    saved = torch.load(state_file, weights_only=False)
    saved["state"]["step"] = 1  # as if the run died between writing the weights and the trainer state
    torch.save(saved, state_file)
    with pytest.raises(RuntimeError, match="weights are from step 2 but trainer_state.pt from step 1"):
        recipe_trainer(cfg, resume=True)


def test_too_many_bad_samples_stop_the_run_with_a_count_and_a_checkpoint(base, shapes, tmp_path):
    """A quarter of the records are bad: past 50 samples seen, a 10% limit stops the run (saved, resumable), and
    a 30% limit lets one epoch finish with every bad sample counted."""
    from mmalign.train.loop import TooManyBadSamples

    records = (json.loads(open(shapes["conversations"]).read()) * 2)[:64]
    for i in range(0, 64, 4):
        records[i] = {"id": f"bad-{i}", "image": "nope.png", "conversations": records[i + 1]["conversations"]}
    data = tmp_path / "quarter_bad.json"
    data.write_text(json.dumps(records))
    cfg = recipe(base, shapes, tmp_path, max_steps=8, batch_size=8, data={"train": str(data), "max_skip_fraction": 0.1})
    with pytest.raises(TooManyBadSamples) as err:
        train(cfg)
    bad, seen = map(
        int, re.match(r"(\d+) of (\d+) samples were bad \(> data.max_skip_fraction=0.1\)", str(err.value)).groups()
    )
    assert 50 <= seen < 64 and seen % 8 == 0 and bad / seen > 0.1  # stopped at the first batch past 50 samples
    assert len((tmp_path / "run/skipped.jsonl").read_text().splitlines()) == bad
    state = torch.load(tmp_path / "run/trainer_state.pt", weights_only=False)["state"]
    assert state["step"] == seen // 8 - 1 and state["skipped"] < bad  # the last completed step, before the stop

    cfg = recipe(base, shapes, tmp_path / "lenient", max_steps=8, batch_size=8,
                 data={"train": str(data), "max_skip_fraction": 0.3})  # fmt: skip
    assert train(cfg)["skipped"] == 16


def test_eval_every_and_save_every_fire_at_their_steps(base, shapes, tmp_path, monkeypatch):
    from mmalign.train.trainer import Trainer

    saves, original = [], Trainer.save

    def spy(self):
        saves.append(self.state["step"])
        return original(self)

    monkeypatch.setattr(Trainer, "save", spy)
    cfg = recipe(base, shapes, tmp_path, max_steps=6, batch_size=4, eval_every=2, save_every=4,
                 data={"val": shapes["val"]})  # fmt: skip
    console = Console(file=io.StringIO(), width=200)
    summary = train(cfg, console=console)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6]  # every 2 steps, and once at the end
    assert saves == [4, 6]  # every 4 steps, and once at the end
    assert summary["val_loss"] == rows[-1]["val_loss"] and 0 < summary["val_loss"] < 20
    assert "6 steps" in console.file.getvalue()  # the run prints to the console it is given


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)]
)
def test_precision_sets_the_compute_dtype_and_keeps_fp32_weights(base, shapes, tmp_path, precision, dtype):
    """bf16 runs the forward under autocast (matmuls in bf16, weights and optimizer in fp32); auto on a CPU is fp32."""
    trainer = recipe_trainer(recipe(base, shapes, tmp_path, max_steps=2, batch_size=4, precision=precision))
    model = trainer.objective.model
    seen = []
    model.llm.model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.fit()
    assert seen and set(seen) == {dtype}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(math.isfinite(v) for v in trainer.history["lm"])


def test_a_checkpoint_lacking_required_weights_is_refused(base, shapes, tmp_path):
    train(recipe(base, shapes, tmp_path, max_steps=1, trainable=["connector"]))
    weights = load_file(tmp_path / "run/model.safetensors")
    assert any(k.startswith("connectors.") for k in weights)
    save_file({k: v for k, v in weights.items() if k != "connectors.image.layers.0.weight"},
              tmp_path / "run/model.safetensors")  # fmt: skip
    with pytest.raises(KeyError, match=r"1 required weights are missing, e.g. \['connectors.image.layers.0.weight'\]"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="is not an mmalign checkpoint \\(no model_config.yaml\\)"):
        load_checkpoint(tmp_path)
    save_file(weights | {"connectors.image.extra": torch.zeros(2)}, tmp_path / "run/model.safetensors")
    with pytest.raises(KeyError, match=r"1 weights do not fit this model, e.g. \['connectors.image.extra'\]"):
        load_checkpoint(tmp_path / "run")
