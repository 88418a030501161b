"""Named registries for encoders, connectors, alignment families and modalities, so a new one is one decorated
function (or one registered object) in one file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """A name -> builder map with a decorator to fill it and an error that lists what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._patterns: list[tuple[Callable[[str], dict | None], Callable[..., Any]]] = []

    def register(self, name: str) -> Callable:
        def wrap(fn: Callable) -> Callable:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return wrap

    def register_pattern(self, match: Callable[[str], dict | None]) -> Callable:
        """Register a builder for a family of names; `match(name)` returns builder kwargs or None."""

        def wrap(fn: Callable) -> Callable:
            self._patterns.append((match, fn))
            return fn

        return wrap

    def build(self, name: str, **kwargs: Any) -> Any:
        if name in self._builders:
            return self._builders[name](**kwargs)
        for match, fn in self._patterns:
            extra = match(name)
            if extra is not None:
                return fn(**extra, **kwargs)
        raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")

    def get(self, name: str) -> Any:
        """The registered object itself (for registries of objects rather than builders)."""
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders) + [f"<{fn.__name__}>" for _, fn in self._patterns]

    def __contains__(self, name: str) -> bool:
        return name in self._builders or any(m(name) is not None for m, _ in self._patterns)


ENCODERS = Registry("encoder")
CONNECTORS = Registry("connector")
FAMILIES = Registry("family")
register_encoder = ENCODERS.register
register_connector = CONNECTORS.register
register_family = FAMILIES.register
