"""Fine-tuning strategies: layer-range freezing, per-group learning rates and layer-wise decay read one layer order;
LoRA/DoRA targets resolve to explicit modules inside trained parts only; merge-then-export keeps the adapted
model's logits; a stage may continue from another stage's adapters with another strategy."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from transformers import LlavaForConditionalGeneration

from helpers import tiny_model_config
from mmalign.config import ConfigError, LoraConfig, TrainConfig
from mmalign.interop.hf_llava import export_hf_llava
from mmalign.models.adapters import inject_adapters, merged_copy, resolve_targets
from mmalign.models.builder import build_model
from mmalign.models.layers import parse_selector
from mmalign.train.checkpoint import WEIGHTS, load_checkpoint
from mmalign.train.freeze import set_trainable
from mmalign.train.loop import recipe_trainer
from mmalign.train.optim import build_optimizer_groups
from test_train import recipe


def tiny(shapes, layers=4, tie=False):
    cfg = tiny_model_config(shapes["tokenizer"])
    cfg.llm.config |= {"num_hidden_layers": layers, "tie_word_embeddings": tie}
    model, _ = build_model(cfg)
    return model


def trainable_names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_selectors_parse_groups_and_python_slices():
    assert parse_selector("llm").layers is None
    assert parse_selector("llm.layers[-4:]").layers == slice(-4, None)
    assert parse_selector("encoder.image.layers[:6]").group == "encoder.image"
    assert parse_selector("llm.layers[3]").layers == slice(3, 4)
    assert parse_selector("llm.layers[-1]").layers == slice(-1, None)
    for bad in ("llm.layers[a:b]", "llm.layers[1:2:3:4]", "llm layers"):
        with pytest.raises(ConfigError):
            parse_selector(bad)


def test_layer_ranges_train_exactly_the_chosen_blocks(shapes):
    model = tiny(shapes)
    set_trainable(model, ["connector", "llm.layers[-2:]", "encoder.image.layers[:1]"])
    layers = model.llm.model.layers
    for i, block in enumerate(layers):
        assert all(p.requires_grad == (i >= 2) for p in block.parameters())
    assert not model.llm.model.embed_tokens.weight.requires_grad and not model.llm.model.norm.weight.requires_grad
    vision = model.encoders["image"].tower.encoder.layers
    assert all(p.requires_grad for p in vision[0].parameters())
    assert not any(p.requires_grad for block in vision[1:] for p in block.parameters())
    assert all(p.requires_grad for p in model.connectors["image"].parameters())
    with pytest.raises(ConfigError, match="selects none of llm's 4 layers"):
        set_trainable(model, ["llm.layers[9:]"])
    with pytest.raises(ConfigError, match="no stack of layers"):
        set_trainable(model, ["connector.layers[0]"])
    with pytest.raises(ConfigError, match="'vision', which selects no group"):
        set_trainable(model, ["vision"])


def test_group_rates_and_layer_decay_follow_the_layer_order(shapes):
    model = tiny(shapes)
    set_trainable(model, ["encoder", "connector", "llm"])
    cfg = TrainConfig(lr=1e-3, layer_decay=0.5, group_lr={"connector": 1e-2, "encoder": 1.0, "encoder.image": 1e-4})
    lr = {id(p): g["lr"] for g in build_optimizer_groups(model, cfg) for p in g["params"]}
    llm = model.llm.model
    top = len(llm.layers) + 1  # stem 0, block i at i + 1, final norm at the top
    assert lr[id(llm.embed_tokens.weight)] == pytest.approx(1e-3 * 0.5**top)
    for i, block in enumerate(llm.layers):
        assert [lr[id(p)] for p in block.parameters()] == pytest.approx([1e-3 * 0.5 ** (top - i - 1)] * 9)
    assert lr[id(llm.norm.weight)] == pytest.approx(1e-3)
    assert {lr[id(p)] for p in model.connectors["image"].parameters()} == {1e-2}  # one level, no decay
    vision = model.encoders["image"].tower
    n = len(vision.encoder.layers) + 1
    assert lr[id(vision.encoder.layers[0].mlp.fc1.weight)] == pytest.approx(1e-4 * 0.5 ** (n - 1))  # longest name
    decays = {
        g["weight_decay"]
        for g in build_optimizer_groups(model, TrainConfig(weight_decay=0.1))
        for p in g["params"]
        if p.ndim < 2
    }
    assert decays == {0.0}
    with pytest.raises(ConfigError, match="train.group_lr names \\['vision'\\]"):
        build_optimizer_groups(model, TrainConfig(group_lr={"vision": 1e-4}))


def test_lora_targets_never_land_in_frozen_towers(shapes):
    model = tiny(shapes)  # the CLIP tower also has q_proj/k_proj/v_proj: a suffix match would adapt it
    attention = LoraConfig(targets=["q_proj", "v_proj"], groups=["llm", "encoder.image"])
    names = resolve_targets(model, ["connector", "llm"], attention)
    assert len(names) == 2 * 4 and all(n.startswith("llm.model.layers.") for n in names)
    assert resolve_targets(model, ["connector", "llm.layers[-1:]"], attention) == [
        "llm.model.layers.3.self_attn.q_proj",
        "llm.model.layers.3.self_attn.v_proj",
    ]
    with_tower = resolve_targets(model, ["encoder.image", "llm.layers[0]"], attention)
    assert sum(n.startswith("encoders.image.") for n in with_tower) == 2 * 3 and len(with_tower) == 2 * 3 + 2
    every = resolve_targets(model, ["llm"], LoraConfig(targets=["all-linear"]))
    assert len(every) == 7 * 4 and "llm.lm_head" not in every
    with pytest.raises(ConfigError, match="match no Linear module"):
        resolve_targets(model, ["llm"], LoraConfig(targets=["qkv"]))
    inject_adapters(model, LoraConfig(targets=["q_proj"], modules=names))
    set_trainable(model, ["connector", "llm"], adapted=["llm"])
    adapted = {n.split(".lora_")[0] for n in trainable_names(model) if "lora_" in n}
    assert adapted == set(names)
    assert not any("lora_" in n for n, _ in model.encoders["image"].named_parameters())


def test_merged_adapters_keep_the_logits_and_the_tied_head(shapes):
    model = tiny(shapes, tie=True)
    lora = LoraConfig(r=4, targets=["all-linear"], dora=True)
    inject_adapters(model, LoraConfig(**{**lora.__dict__, "modules": resolve_targets(model, ["llm"], lora)}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # fresh adapters are zero: make them change the model
    ids = torch.randint(10, 30, (2, 9))
    model.eval()
    merged = merged_copy(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert any("lora_" in n for n, _ in model.named_parameters())  # the live model keeps its adapters
    assert merged.llm.lm_head.weight is merged.llm.get_input_embeddings().weight
    with torch.no_grad():
        base_logits = tiny(shapes, tie=True).eval()(ids)["logits"]
        adapted, folded = model(ids)["logits"], merged(ids)["logits"]
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    torch.testing.assert_close(folded, adapted, atol=1e-4, rtol=1e-4)


def test_dora_in_both_towers_trains_reloads_and_exports_with_its_logits(base, shapes, tmp_path):
    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "out_proj", "o_proj"], groups=["llm", "encoder"])
    cfg = recipe(base, shapes, tmp_path, max_steps=3, lr=1e-2, finetune="dora", lora=lora,
                 trainable=["connector", "llm.layers[-1:]", "encoder.image"])  # fmt: skip
    console = Console(record=True, width=160)
    trainer = recipe_trainer(cfg, console=console)
    model = trainer.objective.model
    assert any("lora_magnitude_vector" in n for n in trainable_names(model))
    trainer.fit()
    shown = console.export_text()
    assert "dora adapters on 12 modules" in shown and "llm.model.layers.{1}.self_attn.q_proj" in shown
    assert "1 of 2" in shown  # the table's layers-trained column for the LLM
    reloaded, tok, model_cfg = load_checkpoint(tmp_path / "run")
    assert model_cfg.lora.dora and len(model_cfg.lora.modules) == 12
    n_img = reloaded.encoders["image"].num_tokens
    ids = torch.tensor([[2, 6] + [reloaded.media_token_ids["image"]] * n_img + [10, 11, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ours = model(ids, media={"image": pixels})["logits"]
        torch.testing.assert_close(reloaded(ids, media={"image": pixels})["logits"], ours)
    export_hf_llava(reloaded, tok, model_cfg, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-4, rtol=1e-4)


def test_a_stage_continues_from_lora_with_full_finetuning(base, shapes, tmp_path):
    first = recipe(base, shapes, tmp_path / "a", max_steps=3, lr=1e-2, finetune="lora", lora=LoraConfig(r=4))
    recipe_trainer(first).fit()
    adapted, _, _ = load_checkpoint(tmp_path / "a/run")
    second = recipe(base, shapes, tmp_path / "b", max_steps=1, init_from=str(tmp_path / "a/run"))
    model = recipe_trainer(second).objective.model.eval()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    ids = torch.tensor([[2, 6] + [model.media_token_ids["image"]] * model.encoders["image"].num_tokens + [10, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, media={"image": pixels})["logits"], adapted(ids, media={"image": pixels})["logits"],
            atol=1e-4, rtol=1e-4,
        )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where 4-bit weights cannot run")
def test_qlora_says_what_it_needs(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=1, finetune="qlora")
    with pytest.raises(ConfigError, match="bitsandbytes|CUDA GPU"):
        recipe_trainer(cfg)


@pytest.mark.parametrize("source", ["checkpoint", "weights-only"])
def test_a_stage_that_freezes_what_the_last_one_tuned_saves_the_tuned_weights(base, shapes, tmp_path, source):
    import shutil

    recipe_trainer(recipe(base, shapes, tmp_path / "a", max_steps=2, lr=1e-2)).fit()  # tunes connector and llm
    tuned, _, _ = load_checkpoint(tmp_path / "a/run")
    start = tmp_path / "a/run"
    if source == "weights-only":  # a folder with the weights file alone: no model config to read adapters from
        start = tmp_path / "weights"
        start.mkdir()
        shutil.copy(tmp_path / "a/run" / WEIGHTS, start)
    second = recipe(base, shapes, tmp_path / "b", max_steps=1, init_from=str(start), trainable=["connector"])
    recipe_trainer(second).fit()
    # The llm's `path` holds the untuned base, so the second checkpoint must carry the llm tuned in the first.
    reloaded, _, _ = load_checkpoint(tmp_path / "b/run")
    for (name, p), (_, q) in zip(reloaded.llm.named_parameters(), tuned.llm.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
