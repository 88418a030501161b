"""Writing a whole folder as one unit: it appears complete or not at all, and never lands on a user's files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def publish_folder(out: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a fresh folder beside `out`, then rename it to `out`. A non-empty `out` is refused
    unless `overwrite`; then it is replaced only once the new folder is complete."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out names a folder to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out, or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind, and `out` untouched
        raise
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
