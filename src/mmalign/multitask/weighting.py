"""Loss weightings for multi-task training that return one scalar for the ordinary training loop to backpropagate.

None of them calls `.backward()`: each turns the per-task losses into ONE scalar, and the trainer's usual
`scaler.scale(total).backward()` does the rest. That keeps them correct under DDP (one backward per step, gradients
reduced once), gradient accumulation and autocast + GradScaler. A weighting that ran its own backward passes would
compose with none of these.

Losses come in as `{task: scalar mean loss}`. With per-task sampling a batch may carry only some tasks; the ones
missing from a batch are skipped, and a task the weighting was not built for is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from mmalign.registry import Registry

WEIGHTINGS = Registry("loss weighting")
register_weighting = WEIGHTINGS.register


def build_weighting(name: str, tasks: list[str], **settings) -> LossWeighting:
    """The weighting registered as `name`, over `tasks`, with its own keyword settings."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; registered: {', '.join(WEIGHTINGS.names())}")
    return WEIGHTINGS.build(name, tasks=tasks, **settings)


class LossWeighting(nn.Module):
    """Base class: `forward(losses, shared)` -> the scalar to backpropagate; `weights()` and `figures()` for
    logging; `after_step()` after each optimizer step."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        if not tasks:
            raise ValueError("a loss weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names repeat: {tasks}")
        self.tasks = sorted(tasks)

    def forward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """The current effective weight of each task's loss."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step; weightings with constraints on their parameters enforce them here."""

    def figures(self) -> dict[str, float]:
        """Extra figures to log beside the weights."""
        return {}

    def _present(self, losses: dict[str, torch.Tensor]) -> list[int]:
        """Indices into `self.tasks` of the tasks this batch carries, after checking the losses."""
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"losses for unknown task(s) {unknown}; this weighting was built for {self.tasks}")
        present = [i for i, task in enumerate(self.tasks) if task in losses]
        if not present:
            raise ValueError(f"no task losses given; expected some of {self.tasks}")
        for i in present:
            if losses[self.tasks[i]].dim() != 0:
                shape = tuple(losses[self.tasks[i]].shape)
                raise ValueError(f"loss of task {self.tasks[i]!r} has shape {shape}; pass the scalar mean loss")
        return present


@register_weighting("fixed")
class FixedWeighting(LossWeighting):
    """Total = Σ w_i L_i with constant weights (1.0 for any task not given)."""

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"weights for unknown task(s) {unknown}; tasks are {self.tasks}")
        for task, weight in weights.items():
            if weight < 0:
                raise ValueError(f"task {task!r} has negative loss weight {weight}")
        self._weights = {task: float(weights.get(task, 1.0)) for task in self.tasks}

    def forward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor | None = None) -> torch.Tensor:
        present = self._present(losses)
        return sum(self._weights[self.tasks[i]] * losses[self.tasks[i]] for i in present)

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, eq. 7 in the form commonly used).

    One learnable s_i = log σ_i² per task; total = Σ 0.5·exp(−s_i)·L_i + 0.5·s_i, so a noisy task (large
    irreducible loss) learns a large σ² and a small weight 0.5·exp(−s_i). Its parameter `log_var` must reach the
    optimizer: it does when this module is a submodule of the objective whose parameters the optimizer gets.
    """

    def __init__(self, tasks: list[str], min_log_var: float = -4.0, max_log_var: float = 4.0):
        super().__init__(tasks)
        if min_log_var >= max_log_var:
            raise ValueError(f"min_log_var ({min_log_var}) must be below max_log_var ({max_log_var})")
        self.min_log_var = float(min_log_var)
        self.max_log_var = float(max_log_var)
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))  # (tasks,) in sorted task order

    def forward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor | None = None) -> torch.Tensor:
        present = self._present(losses)
        return sum(0.5 * torch.exp(-self.log_var[i]) * losses[self.tasks[i]] + 0.5 * self.log_var[i] for i in present)

    def weights(self) -> dict[str, float]:
        effective = 0.5 * torch.exp(-self.log_var.detach())
        return {task: float(effective[i]) for i, task in enumerate(self.tasks)}

    @torch.no_grad()
    def after_step(self) -> None:
        # A task whose loss nears zero drives s_i towards −∞: the 0.5·s_i term makes the total negative and
        # unbounded and the weight exp(−s_i) explodes (a known complaint about this method). Clamping s_i bounds
        # every weight to [0.5·e^−max, 0.5·e^−min].
        self.log_var.clamp_(self.min_log_var, self.max_log_var)


@register_weighting("gradnorm")
class GradNormWeighting(LossWeighting):
    """GradNorm (Chen et al. 2018), measuring gradients at the shared representation rather than the last shared
    layer's weights, so it needs no per-task backward over the parameters.

    `forward` needs `shared`, the tensor every task head reads (still in the autograd graph). Per present task:
    g_i = ‖∂L_i/∂shared‖₂, r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0)), target_i = mean_j(w_j g_j)·r_i^α (detached),
    and the GradNorm loss Σ|w_i g_i − target_i| (§3.2, eq. 2). The returned total is Σ w_i.detach()·L_i + that loss:
    the weights learn only from the GradNorm loss, the model only from the weighted task losses (g and the target
    are detached, so the GradNorm loss has no gradient w.r.t. the model). A batch with a single task gives a zero
    GradNorm loss (r = 1), so the weights only learn from batches that carry several tasks.
    """

    def __init__(self, tasks: list[str], alpha: float = 1.5, min_weight: float = 1e-3):
        super().__init__(tasks)
        if min_weight <= 0:
            raise ValueError(f"min_weight must be > 0, got {min_weight}")
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))  # (tasks,) in sorted task order
        # L_i(0) per task and whether it has been recorded; buffers so a resumed run keeps its reference losses.
        self.register_buffer("initial_loss", torch.zeros(len(self.tasks)))
        self.register_buffer("seen", torch.zeros(len(self.tasks), dtype=torch.bool))

    def forward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor | None = None) -> torch.Tensor:
        if shared is None:
            raise ValueError("GradNorm needs `shared`, the representation every task head reads")
        present = self._present(losses)
        task_losses = [losses[self.tasks[i]] for i in present]
        index = torch.tensor(present, device=self.task_weights.device)
        with torch.no_grad():
            current = torch.stack([loss.detach().float() for loss in task_losses])  # (present,)
            # Record L_i(0) the first time each task shows up, without a host sync per task.
            self.initial_loss[index] = torch.where(self.seen[index], self.initial_loss[index], current)
            self.seen[index] = True

        norms = []
        for i, loss in zip(present, task_losses, strict=True):
            (grad,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            if grad is None:
                raise ValueError(f"loss of task {self.tasks[i]!r} does not depend on `shared`")
            # float32: a bf16/fp16 gradient's squared sum overflows or loses precision easily.
            norms.append(grad.detach().float().norm())
        grad_norm = torch.stack(norms)  # (present,)

        weight = self.task_weights[index]  # (present,)
        with torch.no_grad():
            # The floor only guards a task whose first loss was exactly zero.
            ratio = current / self.initial_loss[index].clamp_min(1e-12)  # inverse training rate, §3.2
            relative = ratio / ratio.mean()
            target = (weight * grad_norm).mean() * relative**self.alpha
        gradnorm_loss = (weight * grad_norm - target).abs().sum()
        weighted = sum(weight[k].detach() * loss for k, loss in enumerate(task_losses))
        return weighted + gradnorm_loss

    def weights(self) -> dict[str, float]:
        weight = self.task_weights.detach()
        return {task: float(weight[i]) for i, task in enumerate(self.tasks)}

    @torch.no_grad()
    def after_step(self) -> None:
        # §3.2: renormalise so Σ w_i = number of tasks, which decouples the weights from the global learning rate;
        # the floor keeps a weight from reaching zero or going negative before that.
        self.task_weights.clamp_(min=self.min_weight)
        self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())


@register_weighting("pcgrad")
class PCGradWeighting(LossWeighting):
    """PCGrad gradient surgery (Yu et al. 2020), applied to the gradient at the shared representation.

    Per present task, g_i = ∂(w_i L_i)/∂shared. Where two tasks conflict (g_i·g_j < 0), g_i loses its component
    along g_j: g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j, over the other tasks in a random order (Alg. 1). Everything
    upstream of `shared` (encoders, fusion) then receives Σ projected g_i instead of Σ g_i; the heads and any
    layers between `shared` and them keep their own task's gradient, as in the paper, where only shared
    parameters are projected.

    Measuring at `shared` (B, D) rather than at every shared parameter costs one small `autograd.grad` per task
    and no backward of our own: the returned total is Σ w_i L_i + ⟨shared, c⟩ − ⟨shared.detach(), c⟩ with
    c = (Σ projected g_i − Σ g_i) detached. Its value is the plain weighted sum, and its gradient at `shared` is
    the projected sum, so GradScaler, accumulation and DDP treat it like any loss. Under DDP the projection uses
    each rank's own micro-batch; the ranks' results are then averaged as usual.
    """

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks)
        self._weights = FixedWeighting(tasks, weights).weights()
        self.seed = int(seed)
        # Calls so far: seeds the projection order, saved so a resumed run continues the same sequence.
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.conflicts = 0.0  # share of task pairs that conflicted in the last batch, for logging

    def forward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor | None = None) -> torch.Tensor:
        if shared is None:
            raise ValueError("PCGrad needs `shared`, the representation every task head reads")
        present = self._present(losses)
        weighted = [self._weights[self.tasks[i]] * losses[self.tasks[i]] for i in present]
        total = sum(weighted)
        if len(present) < 2:
            return total
        grads = []
        for i, loss in zip(present, weighted, strict=True):
            (grad,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            if grad is None:
                raise ValueError(f"loss of task {self.tasks[i]!r} does not depend on `shared`")
            grads.append(grad.detach().flatten().float())  # float32: dot products of bf16 gradients lose too much
        grads = torch.stack(grads)  # (present, B * D)
        projected, conflicts = project_conflicting(grads, self._generator())
        self.calls += 1
        self.conflicts = conflicts / (len(grads) * (len(grads) - 1))
        change = (projected - grads).sum(0).view_as(shared).to(shared.dtype)
        # Zero in value, `change` in gradient at `shared`.
        return total + (shared * change).sum() - (shared.detach() * change).sum()

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.calls))

    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def figures(self) -> dict[str, float]:
        return {"pcgrad_conflicts": self.conflicts}


def project_conflicting(grads: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """PCGrad's projection (Yu et al. 2020, Alg. 1) of task gradients `grads` (tasks, n): each row loses its
    component along every other task's original gradient it conflicts with, visited in a random order. Returns
    the projected rows and how many (i, j) projections happened."""
    projected = grads.clone()
    conflicts = 0
    for i in range(len(grads)):
        others = [j for j in torch.randperm(len(grads), generator=generator).tolist() if j != i]
        for j in others:
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / grads[j].square().sum().clamp_min(1e-20) * grads[j]
                conflicts += 1
    return projected, conflicts
