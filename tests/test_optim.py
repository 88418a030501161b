"""AdamW groups and the schedule, by value: weight decay lands on matrices only, the connector's own rate, the
warm-up + cosine multipliers, and the rates a run actually steps with."""

from __future__ import annotations

import json
import math

import pytest

from mmalign.config import TrainConfig
from mmalign.train.freeze import set_trainable
from mmalign.train.loop import train
from mmalign.train.optim import build_optimizer_groups, decay_groups, warmup_cosine
from test_strategies import tiny
from test_train import recipe


def by_param(groups, key):
    return {id(p): g[key] for g in groups for p in g["params"]}


def test_weight_decay_is_on_matrices_and_never_on_biases_or_norms(shapes):
    model = tiny(shapes)
    set_trainable(model, ["encoder", "connector", "llm"])
    decay = by_param(build_optimizer_groups(model, TrainConfig(weight_decay=0.1)), "weight_decay")
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(decay) == len(params)  # every trainable parameter is in exactly one group
    assert {decay[id(p)] for p in params if p.ndim >= 2} == {0.1}
    assert {decay[id(p)] for p in params if p.ndim < 2} == {0.0}
    assert decay[id(model.llm.model.norm.weight)] == 0.0
    assert decay[id(model.connectors["image"].linears[0].bias)] == 0.0

    groups = decay_groups(params, 0.05)  # the contrastive objectives' two groups
    assert {g["weight_decay"] for g in groups for p in g["params"] if p.ndim >= 2} == {0.05}
    assert {g["weight_decay"] for g in groups for p in g["params"] if p.ndim < 2} == {0.0}
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_connector_lr_sets_the_connector_rate_and_group_lr_overrides_it(shapes):
    model = tiny(shapes)
    set_trainable(model, ["connector", "llm"])
    lr = by_param(build_optimizer_groups(model, TrainConfig(lr=1e-3, connector_lr=5e-2)), "lr")
    assert {lr[id(p)] for p in model.connectors["image"].parameters()} == {5e-2}
    assert {lr[id(p)] for p in model.llm.parameters() if p.requires_grad} == {1e-3}
    lr = by_param(
        build_optimizer_groups(model, TrainConfig(lr=1e-3, connector_lr=5e-2, group_lr={"connector": 2e-2})), "lr"
    )
    assert {lr[id(p)] for p in model.connectors["image"].parameters()} == {2e-2}


def test_warmup_then_cosine_values():
    f = warmup_cosine(10, 0.2)  # 2 warm-up steps, then 8 of cosine
    assert [f(0), f(1)] == pytest.approx([0.5, 1.0])
    assert [f(2), f(6), f(10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert f(12) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at the floor
    g = warmup_cosine(10, 0.0, min_ratio=0.1)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1) and g(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 0.001)(0) == 1.0  # a warm-up shorter than a step is one step


def test_a_run_steps_with_the_scheduled_rates(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.25, trainable=["connector"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows if "lr" in r]  # the rate after each step: 1 warm-up step, then cosine
    assert logged == pytest.approx([1e-2, 7.5e-3, 2.5e-3, 0.0], abs=1e-12)


def test_adamw_receives_the_groups(base, shapes, tmp_path):
    from mmalign.train.loop import recipe_trainer

    cfg = recipe(base, shapes, tmp_path, max_steps=2, lr=1e-3, connector_lr=4e-3, weight_decay=0.2, betas=[0.8, 0.95])
    trainer = recipe_trainer(cfg)
    model = trainer.objective.model
    seen = {id(p): (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups for p in g["params"]}
    weight, bias = model.connectors["image"].linears[0].weight, model.connectors["image"].linears[0].bias
    assert seen[id(weight)] == (4e-3, 0.2) and seen[id(bias)] == (4e-3, 0.0)
    assert seen[id(model.llm.model.norm.weight)] == (1e-3, 0.0)
    assert {tuple(g["betas"]) for g in trainer.optimizer.param_groups} == {(0.8, 0.95)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable


@pytest.mark.parametrize("decay", [1.0, 0.5, 2.0])
def test_each_group_carries_its_name_depth_and_decayed_rate(shapes, decay):
    from mmalign.models.layers import depths

    model = tiny(shapes)
    set_trainable(model, ["encoder", "connector", "llm"])
    groups = build_optimizer_groups(model, TrainConfig(lr=1e-3, layer_decay=decay))
    modules = model.param_groups()
    assert {g["group"] for g in groups} == set(modules)  # every parameter under its own group's name
    for g in groups:
        level, top = depths(modules[g["group"]])
        if decay == 1.0:  # no decay: no split by depth, every group one level
            assert g["depth"] == 0 and g["lr"] == 1e-3
        else:
            assert {level[id(p)] for p in g["params"]} == {g["depth"]}
            assert g["lr"] == pytest.approx(1e-3 * decay ** (top - g["depth"]))
    levels = depths(modules["llm"])[1] + 1  # embeddings, each block, then norm and head
    assert len({g["depth"] for g in groups if g["group"] == "llm"}) == (1 if decay == 1.0 else levels)


def test_nothing_to_train_says_what_was_selected(shapes):
    model = tiny(shapes)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^no trainable parameters \(train.trainable=\['connector'\]\)$"):
        build_optimizer_groups(model, TrainConfig(trainable=["connector"]))
