"""Atomic file writes: a temporary file in the same directory, then `os.replace`, so a reader (or a
run killed mid-write) sees the old file or the new one, never a partial one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` by calling `write_fn(binary file)` on a temporary file, then renaming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> Path:
    """`json.dumps(obj, **dumps_kw)` (default indent=1) to `path`, atomically."""
    return write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kw}))
