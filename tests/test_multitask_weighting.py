"""Multi-task sampling draws the shares it reports and resumes exactly; loss weightings follow their papers'
formulas, move in the expected direction on tiny regression problems, and never leak into the model's gradient."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmalign.multitask.sampling import STRATEGIES, TaskSampler
from mmalign.multitask.weighting import (
    WEIGHTINGS,
    FixedWeighting,
    GradNormWeighting,
    PCGradWeighting,
    UncertaintyWeighting,
    build_weighting,
    project_conflicting,
)

SIZES = {"a": 600, "b": 300, "c": 100}


def draw_shares(sampler: TaskSampler, n: int = 20_000, seed: int = 0) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    counts = Counter(sampler.task_for(cursor, generator) for cursor in range(n))
    return {task: counts[task] / n for task in sampler.tasks}


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_random_strategies_draw_their_probabilities(strategy):
    sampler = TaskSampler(SIZES, strategy=strategy, temperature=2.0)
    expected = sampler.probabilities()
    assert math.isclose(sum(expected.values()), 1.0)
    shares = draw_shares(sampler)
    for task in SIZES:
        assert abs(shares[task] - expected[task]) < 0.015, (task, shares, expected)


def test_probabilities_follow_their_formulas():
    roots = {task: math.sqrt(n) for task, n in SIZES.items()}
    temperature = TaskSampler(SIZES, strategy="temperature", temperature=2.0).probabilities()
    assert temperature == pytest.approx({task: r / sum(roots.values()) for task, r in roots.items()}, abs=1e-12)
    proportional = TaskSampler(SIZES, strategy="proportional").probabilities()
    assert proportional == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1}, abs=1e-12)
    assert TaskSampler(SIZES, strategy="temperature", temperature=1.0).probabilities() == pytest.approx(proportional)
    assert TaskSampler(SIZES, strategy="uniform").probabilities() == pytest.approx({t: 1 / 3 for t in SIZES})
    assert TaskSampler(SIZES, strategy="temperature").describe() == "temperature T=2: a 47.3%, b 33.4%, c 19.3%"


def test_round_robin_cycles_in_sorted_order_and_ignores_the_generator():
    sampler = TaskSampler({"c": 1, "a": 5, "b": 2}, strategy="round_robin")
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert [sampler.task_for(cursor, generator) for cursor in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert torch.equal(generator.get_state(), state)
    assert sampler.probabilities() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_same_seed_and_cursor_draw_the_same_task(strategy):
    sampler = TaskSampler(SIZES, strategy=strategy)

    def run(cursors):
        return [sampler.task_for(c, torch.Generator().manual_seed(7 * 1_000_003 + c)) for c in cursors]

    first = run(range(200))
    # A resumed run starting at cursor 150 continues the same sequence.
    assert run(range(150, 200)) == first[150:]
    assert len(set(first)) == 3


def test_sampler_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one task"):
        TaskSampler({})
    with pytest.raises(ValueError, match="'b'.*size 0"):
        TaskSampler({"a": 3, "b": 0})
    with pytest.raises(ValueError, match="round_robin"):
        TaskSampler(SIZES, strategy="mixed")
    with pytest.raises(ValueError, match="temperature"):
        TaskSampler(SIZES, strategy="temperature", temperature=0.0)
    assert set(STRATEGIES) == {"proportional", "temperature", "round_robin", "uniform"}


class TwoHeads(nn.Module):
    """A shared linear trunk read by two linear heads; returns the shared features too."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({"clean": nn.Linear(8, 1), "noisy": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shared = self.trunk(x)  # (batch, 8)
        return shared, {task: head(shared).squeeze(-1) for task, head in self.heads.items()}


def test_uncertainty_downweights_the_noisy_task():
    x = torch.randn(256, 4)
    noise = torch.randn(2, 256)
    targets = {"clean": x @ torch.randn(4) + 0.01 * noise[0], "noisy": x @ torch.randn(4) + 2.0 * noise[1]}
    model = TwoHeads()
    weighting = UncertaintyWeighting(["noisy", "clean"])
    assert weighting.weights() == pytest.approx({"clean": 0.5, "noisy": 0.5})
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=0.03)
    for _ in range(300):
        _, preds = model(x)
        total = weighting({task: F.mse_loss(preds[task], targets[task]) for task in targets})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        weighting.after_step()
    weights = weighting.weights()
    assert weights["clean"] > 0.5 > weights["noisy"]
    assert weights["clean"] / weights["noisy"] > 3


def test_uncertainty_total_matches_the_formula_and_the_clamp_holds():
    weighting = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.5, -1.0]))
    total = weighting({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    expected = 0.5 * math.exp(-0.5) * 2.0 + 0.25 + 0.5 * math.exp(1.0) * 3.0 - 0.5
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert weighting.weights() == pytest.approx({"a": 0.5 * math.exp(-0.5), "b": 0.5 * math.exp(1.0)})
    # A batch with only task "b" counts only b's terms.
    assert weighting({"b": torch.tensor(3.0)}).item() == pytest.approx(0.5 * math.exp(1.0) * 3.0 - 0.5, rel=1e-6)

    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([-10.0, 10.0]))
    weighting.after_step()
    assert weighting.log_var.tolist() == [-4.0, 4.0]
    narrow = UncertaintyWeighting(["a", "b"], min_log_var=-1.0, max_log_var=2.0)
    with torch.no_grad():
        narrow.log_var.copy_(torch.tensor([-3.0, 0.5]))
    narrow.after_step()
    assert narrow.log_var.tolist() == [-1.0, 0.5]


def scaled_losses(model: TwoHeads, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Both heads fit the same target; task "big" has its loss scaled ×10, so its gradient at `shared` is ~10×."""
    shared, preds = model(x)
    return shared, {"small": F.mse_loss(preds["clean"], y), "big": 10.0 * F.mse_loss(preds["noisy"], y)}


def test_gradnorm_lowers_the_weight_of_the_large_gradient_task():
    x = torch.randn(64, 4)
    y = x @ torch.randn(4)
    model = TwoHeads()
    model.heads["noisy"].load_state_dict(model.heads["clean"].state_dict())
    weighting = GradNormWeighting(["small", "big"], alpha=1.5)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=0.02)
    for _ in range(40):
        shared, losses = scaled_losses(model, x, y)
        total = weighting(losses, shared=shared)
        optimizer.zero_grad()
        total.backward()
        assert weighting.task_weights.grad.abs().sum() > 0
        optimizer.step()
        weighting.after_step()
        assert sum(weighting.weights().values()) == pytest.approx(2.0, abs=1e-5)
    weights = weighting.weights()
    assert weights["big"] < weights["small"]
    assert weights["big"] < 0.5


def test_gradnorm_term_does_not_reach_the_model_gradient():
    x = torch.randn(32, 4)
    y = x @ torch.randn(4)
    model = TwoHeads()
    weighting = GradNormWeighting(["small", "big"])
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([1.3, 0.7]))  # sorted order: big, small
    params = list(model.parameters())

    shared, losses = scaled_losses(model, x, y)
    total = weighting(losses, shared=shared)
    total_grads = torch.autograd.grad(total, params)

    _, losses = scaled_losses(model, x, y)
    reference = 1.3 * losses["big"] + 0.7 * losses["small"]
    reference_grads = torch.autograd.grad(reference, params)
    for got, want in zip(total_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_gradnorm_needs_shared_and_keeps_its_first_losses_through_state_dict():
    weighting = GradNormWeighting(["a", "b"])
    with pytest.raises(ValueError, match="shared"):
        weighting({"a": torch.tensor(1.0)})
    shared = torch.randn(3, 2, requires_grad=True)
    weighting({"a": (shared * 2).sum(), "b": shared.pow(2).sum()}, shared=shared)
    weighting({"a": (shared * 5).sum()}, shared=shared)  # later batches do not overwrite L_a(0)
    restored = GradNormWeighting(["a", "b"])
    restored.load_state_dict(weighting.state_dict())
    assert restored.seen.tolist() == [True, True]
    torch.testing.assert_close(restored.initial_loss, weighting.initial_loss)
    assert restored.initial_loss[0].item() == pytest.approx((shared * 2).sum().item())


def test_fixed_weighting_sums_weighted_losses_and_skips_absent_tasks():
    weighting = FixedWeighting(["a", "b", "c"], weights={"a": 2.0, "c": 0.5})
    assert weighting.weights() == {"a": 2.0, "b": 1.0, "c": 0.5}
    losses = {"a": torch.tensor(1.5), "b": torch.tensor(4.0), "c": torch.tensor(2.0)}
    assert weighting(losses).item() == pytest.approx(2.0 * 1.5 + 4.0 + 0.5 * 2.0)
    assert weighting({"b": torch.tensor(4.0)}).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="'z'"):
        weighting({"a": torch.tensor(1.0), "z": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="'z'"):
        FixedWeighting(["a"], weights={"z": 1.0})
    with pytest.raises(ValueError, match="negative"):
        FixedWeighting(["a"], weights={"a": -1.0})


def test_weightings_name_what_is_wrong_with_their_inputs():
    with pytest.raises(ValueError, match="^a loss weighting needs at least one task$"):
        FixedWeighting([])
    with pytest.raises(ValueError, match=r"task names repeat: \['a', 'a'\]"):
        FixedWeighting(["a", "a"])
    weighting = FixedWeighting(["a", "b"])
    with pytest.raises(ValueError, match=r"no task losses given; expected some of \['a', 'b'\]"):
        weighting({})
    with pytest.raises(ValueError, match=r"loss of task 'b' has shape \(2,\); pass the scalar mean loss"):
        weighting({"a": torch.tensor(1.0), "b": torch.ones(2)})


def test_build_weighting_by_name_and_unknown_names_list_the_registry():
    assert set(WEIGHTINGS.names()) >= {"fixed", "uncertainty", "gradnorm", "pcgrad"}
    assert isinstance(build_weighting("gradnorm", ["a", "b"], alpha=0.5), GradNormWeighting)
    assert build_weighting("fixed", ["b", "a"], weights={"a": 3.0}).weights() == {"a": 3.0, "b": 1.0}
    with pytest.raises(ValueError, match="fixed, gradnorm, pcgrad, uncertainty"):
        build_weighting("nope", ["a"])


def _two_heads(h1, h2, weights=None):
    """shared = u (1, 3) read by two linear heads: ∂L_a/∂shared = w_a·h1 and ∂L_b/∂shared = w_b·h2."""
    u = nn.Parameter(torch.tensor([0.3, -0.2, 0.5]))
    heads = [nn.Parameter(torch.tensor(h, dtype=torch.float32)) for h in (h1, h2)]
    shared = u.unsqueeze(0) * 1.0
    losses = {"a": (heads[0] * shared).sum(), "b": (heads[1] * shared).sum()}
    return u, heads, PCGradWeighting(["a", "b"], weights=weights)(losses, shared)


def test_pcgrad_projects_conflicting_gradients_upstream_of_shared_only():
    u, (h1, h2), total = _two_heads([1.0, 1.0, 0.0], [-1.0, 0.0, 1.0])
    # The value is the plain sum; only the gradient upstream of `shared` changes.
    assert total.item() == pytest.approx(float(u.detach() @ torch.tensor([0.0, 1.0, 1.0])))
    (8.0 * total).backward()  # a GradScaler-like factor passes straight through
    # g_a·g_b = -1 < 0: g_a - (-1/2) g_b = [.5, 1, .5]; g_b - (-1/2) g_a = [-.5, .5, 1]; the plain sum is [0, 1, 1].
    torch.testing.assert_close(u.grad, 8.0 * torch.tensor([0.0, 1.5, 1.5]))
    torch.testing.assert_close(h1.grad, 8.0 * u.detach())  # the heads keep their own task's gradient
    torch.testing.assert_close(h2.grad, 8.0 * u.detach())


def test_pcgrad_leaves_agreeing_tasks_alone_and_scales_by_the_fixed_weights():
    u, _, total = _two_heads([1.0, 1.0, 0.0], [1.0, 0.0, 1.0])
    total.backward()
    torch.testing.assert_close(u.grad, torch.tensor([2.0, 1.0, 1.0]))
    # Weight 2 on a: g_a = [2, 2, 0] and g_b = [-1, 0, 1] conflict (dot -2): g_a + [-1, 0, 1], g_b + 0.25 g_a.
    u, _, total = _two_heads([1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], weights={"a": 2.0})
    total.backward()
    torch.testing.assert_close(u.grad, torch.tensor([1.0, 2.0, 1.0]) + torch.tensor([-0.5, 0.5, 1.0]))


def test_pcgrad_projection_removes_every_conflict_with_the_originals():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 50, generator=generator)
    projected, conflicts = project_conflicting(grads, torch.Generator().manual_seed(1))
    assert conflicts > 0
    changed = (projected - grads).abs().sum(1) > 1e-6
    assert changed.any()
    # Two tasks: one projection each way and the results are orthogonal to the other's original gradient.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    projected, conflicts = project_conflicting(torch.stack([a, b]), generator)
    assert conflicts == 2
    assert float(projected[0] @ b) == pytest.approx(0.0, abs=1e-6)
    assert float(projected[1] @ a) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    same, none = project_conflicting(torch.stack([a, a]), generator)
    assert none == 0 and torch.equal(same, torch.stack([a, a]))


def test_pcgrad_needs_shared_and_logs_its_conflicts():
    weighting = PCGradWeighting(["a", "b"])
    with pytest.raises(ValueError, match="PCGrad needs `shared`"):
        weighting({"a": torch.tensor(1.0)})
    shared = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="'b' does not depend"):
        weighting({"a": (shared * 2).sum(), "b": torch.tensor(1.0, requires_grad=True)}, shared)
    weighting({"a": (shared * torch.tensor([1.0, 0.0, 0.0])).sum(), "b": -(shared.sum())}, shared)
    assert weighting.figures() == {"pcgrad_conflicts": 1.0}
    weighting({"a": shared.sum(), "b": shared.sum()}, shared)
    assert weighting.figures() == {"pcgrad_conflicts": 0.0}
    assert weighting.weights() == {"a": 1.0, "b": 1.0}


def test_pcgrad_order_follows_its_seed_and_call_count_and_resumes_from_its_state():
    # Three pairwise-conflicting tasks: the order each row visits the others changes its projection.
    directions = torch.tensor([[1.0, 0.2, 0.0], [-0.6, 1.0, 0.3], [-0.5, -0.8, 1.0]])

    def call(weighting):
        shared = torch.zeros(1, 3, requires_grad=True)
        losses = {t: (shared * d).sum() for t, d in zip("abc", directions, strict=True)}
        weighting(losses, shared).backward()
        return shared.grad.flatten()

    weighting = PCGradWeighting(list("abc"))  # seed 0 by default
    assert weighting.figures() == {"pcgrad_conflicts": 0.0}  # before any batch
    sums = []
    for k in range(6):
        expected, conflicts = project_conflicting(directions, torch.Generator().manual_seed(k))
        torch.testing.assert_close(call(weighting), expected.sum(0))
        # The share of the 3 x 2 ordered task pairs that were projected.
        assert weighting.figures()["pcgrad_conflicts"] == pytest.approx(conflicts / 6)
        sums.append(expected.sum(0))
    assert any(not torch.allclose(sums[0], s) for s in sums[1:])  # the order did matter
    # Seed s draws call k's order from seed s * 1_000_003 + k; a reloaded weighting goes on with the same sequence.
    seeded = PCGradWeighting(list("abc"), seed=2)
    call(seeded)
    resumed = PCGradWeighting(list("abc"), seed=2)
    resumed.load_state_dict(seeded.state_dict())
    expected, _ = project_conflicting(directions, torch.Generator().manual_seed(2 * 1_000_003 + 1))
    torch.testing.assert_close(call(resumed), expected.sum(0))
    torch.testing.assert_close(call(seeded), expected.sum(0))


def test_weightings_check_their_settings():
    assert FixedWeighting(["a", "b"], weights={"a": 0.0})({"a": torch.tensor(3.0), "b": torch.tensor(2.0)}) == 2.0
    with pytest.raises(ValueError, match=r"^min_log_var \(1.0\) must be below max_log_var \(1.0\)$"):
        UncertaintyWeighting(["a"], min_log_var=1.0, max_log_var=1.0)
    with pytest.raises(ValueError, match="^min_weight must be > 0, got 0$"):
        GradNormWeighting(["a"], min_weight=0)
    assert GradNormWeighting(["a"]).alpha == 1.5  # the paper's choice for most of its experiments
    for weighting in (GradNormWeighting(["a", "b"]), PCGradWeighting(["a", "b"])):
        name = type(weighting).__name__.removesuffix("Weighting")
        with pytest.raises(ValueError, match=f"^{name} needs `shared`, the representation every task head reads$"):
            weighting({"a": torch.tensor(1.0)})
        shared = torch.ones(2, 3, requires_grad=True)
        with pytest.raises(ValueError, match="^loss of task 'b' does not depend on `shared`$"):
            weighting({"a": (shared * 2).sum(), "b": torch.tensor(1.0, requires_grad=True)}, shared)


def test_gradnorm_total_is_the_weighted_losses_plus_equation_2():
    # L_t = s_t * <shared, v_t> with shared = 1, so g_t = s_t |v_t| and L_t = s_t * sum(v_t). The first losses
    # are below 1, so a floor on L(0) meant for zeros would show.
    v = {"a": torch.tensor([0.3, 0.4]), "b": torch.tensor([1.2, 0.5])}
    weighting = GradNormWeighting(["a", "b"])
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([1.3, 0.7]))
    w = [1.3, 0.7]
    first = {"a": 0.4, "b": 0.5}
    for scale in (first, {"a": 0.2, "b": 0.45}):
        shared = torch.ones(1, 2, requires_grad=True)
        total = weighting({t: s * (shared * v[t]).sum() for t, s in scale.items()}, shared=shared)
        losses = [scale[t] * float(v[t].sum()) for t in "ab"]
        g = [scale[t] * float(v[t].norm()) for t in "ab"]
        rates = [scale[t] / first[t] for t in "ab"]  # L_t / L_t(0)
        mean_wg = (w[0] * g[0] + w[1] * g[1]) / 2
        target = [mean_wg * (r / (sum(rates) / 2)) ** 1.5 for r in rates]
        gaps = [w[i] * g[i] - target[i] for i in range(2)]
        assert total.item() == pytest.approx(w[0] * losses[0] + w[1] * losses[1] + sum(map(abs, gaps)), rel=1e-5)
        (grad,) = torch.autograd.grad(total, weighting.task_weights)
        torch.testing.assert_close(grad, torch.tensor([math.copysign(g[i], gaps[i]) for i in range(2)]))


def test_pcgrad_projects_only_real_conflicts_and_exactly_for_small_gradients():
    generator = torch.Generator().manual_seed(0)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    projected, conflicts = project_conflicting(orthogonal, generator)
    assert conflicts == 0 and torch.equal(projected, orthogonal)
    slightly = torch.tensor([[1.0, 0.0], [0.5, 1.0]])  # dot 0.5: they agree, however small the dot
    assert project_conflicting(slightly, generator)[1] == 0
    tiny = 1e-3 * torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # |g|^2 ~ 1e-6: no floor may touch the projection
    projected, conflicts = project_conflicting(tiny, generator)
    assert conflicts == 2
    torch.testing.assert_close(projected, 1e-3 * torch.tensor([[0.5, 0.5], [0.0, 1.0]]))


def test_pcgrad_total_keeps_the_losses_dtype():
    shared = torch.ones(1, 3, dtype=torch.bfloat16, requires_grad=True)
    losses = {"a": shared[0, 0], "b": -shared.sum()}  # they conflict: the projection does change the gradient
    assert PCGradWeighting(["a", "b"])(losses, shared).dtype == torch.bfloat16
