"""A run's metrics: `<workdir>/metrics.jsonl` (one JSON object per line) and, when installed,
TensorBoard events."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from adaparse_jax import atomic

log = logging.getLogger("adaparse_jax.train")
METRICS_JSONL = "metrics.jsonl"


class MetricsWriter:
    """`metrics.jsonl` (one JSON object per line) and, when installed, TensorBoard events.
    `enabled=False` writes nothing (the processes other than 0 of a multi-process run)."""

    def __init__(self, workdir: Path, tensorboard: bool, *, enabled: bool = True):
        self.path = workdir / METRICS_JSONL
        self.enabled = enabled
        self._tb = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                try:
                    from flax.metrics import tensorboard as flax_tb

                    self._tb = flax_tb.SummaryWriter(str(workdir / "tensorboard"))
                except ImportError:
                    log.info("TensorBoard: neither tensorboardX nor TensorFlow is installed; "
                             "metrics go to %s only", self.path)

    def truncate(self, step: int) -> None:
        """Drop lines written after `step` (a crashed run's steps that a resume recomputes)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic.write_text(self.path, "".join(ln + "\n" for ln in lines))

    def write(self, record: Mapping) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    if hasattr(self._tb, "add_scalar"):
                        self._tb.add_scalar(k, v, step)
                    else:
                        self._tb.scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(workdir) / METRICS_JSONL
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
