"""Errors a user can act on, each naming the file or key at fault and what to do about it."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, from another format)."""


def unreadable(path: str | Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupt (a copy cut "
        "short, a full disk?): restore it from a good copy, or start the run again without --resume"
    )
