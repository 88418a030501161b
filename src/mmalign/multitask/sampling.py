"""Which task each batch comes from when every task has its own dataset (MMF's "iteration strategies").

The Trainer hands out batch numbers (cursors); `TaskSampler.task_for(cursor, generator)` maps one to a task name.
All randomness comes from the generator the caller passes, so a resumed run that rebuilds its generators from the
same seed draws the same sequence of tasks.
"""

from __future__ import annotations

import torch

STRATEGIES = ("proportional", "temperature", "round_robin", "uniform")


class TaskSampler:
    """Draws a task per batch from dataset sizes.

    - proportional: p_i ∝ n_i (big datasets dominate; small tasks may be seen too rarely).
    - temperature: p_i ∝ n_i^(1/T), as in XLM / mT5 language sampling; T=1 is proportional, T→∞ is uniform.
    - uniform: p_i = 1/K, drawn at random.
    - round_robin: tasks in turn (sorted order), no randomness; its long-run share is 1/K each.
    """

    def __init__(self, sizes: dict[str, int], strategy: str = "proportional", temperature: float = 2.0):
        if not sizes:
            raise ValueError("TaskSampler needs at least one task; got no dataset sizes")
        for task, size in sizes.items():
            if size <= 0:
                raise ValueError(f"task {task!r} has dataset size {size}; every task needs at least one example")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        # Sorted, so the task order (and hence every draw) does not depend on dict insertion order.
        self.tasks = sorted(sizes)
        self.sizes = {task: int(sizes[task]) for task in self.tasks}
        self.strategy = strategy
        self.temperature = float(temperature)
        probs = self.probabilities()
        # float64 so the drawn shares match probabilities() to the last digit that matters.
        self._probs = torch.tensor([probs[task] for task in self.tasks], dtype=torch.float64)

    def probabilities(self) -> dict[str, float]:
        """The share of batches each task gets in the long run."""
        if self.strategy in ("uniform", "round_robin"):
            return {task: 1.0 / len(self.tasks) for task in self.tasks}
        power = 1.0 if self.strategy == "proportional" else 1.0 / self.temperature
        scores = {task: float(size) ** power for task, size in self.sizes.items()}
        total = sum(scores.values())
        return {task: score / total for task, score in scores.items()}

    def task_for(self, cursor: int, generator: torch.Generator) -> str:
        """The task of batch number `cursor`; random strategies draw only from `generator`."""
        if self.strategy == "round_robin":
            return self.tasks[cursor % len(self.tasks)]
        index = torch.multinomial(self._probs, 1, generator=generator).item()
        return self.tasks[index]

    def describe(self) -> str:
        """One line for the log, e.g. "temperature T=2: a 62.1%, b 25.3%, c 12.6%"."""
        name = f"temperature T={self.temperature:g}" if self.strategy == "temperature" else self.strategy
        shares = ", ".join(f"{task} {100 * p:.1f}%" for task, p in self.probabilities().items())
        return f"{name}: {shares}"
