"""The one place the forensics commands open a training run: `adaparse_jax.load` plus its data.

`open_run(workdir)` gives what every command reads: the model, its variables at the run's selected
checkpoint, a pure `apply(variables, images)` on uint8 or float images in grey levels (a gradient
attack differentiates with respect to the input), and the run's data (dataset, split, cache, class
weights).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Run:
    loaded: Any  # adaparse_jax.runs.Run: config, model, variables, step, apply (uint8 only)
    data: Any  # train.RunData: dataset, split, cache, train_labels, class_weights

    workdir = property(lambda self: self.loaded.workdir)
    config = property(lambda self: self.loaded.config)
    model = property(lambda self: self.loaded.model)
    variables = property(lambda self: self.loaded.variables)
    step = property(lambda self: self.loaded.step)
    image_size = property(lambda self: self.loaded.spec.image_size)

    def apply(self, variables, images) -> dict:
        """Pure: images [B, S, S, 3] in grey levels, uint8 or float (what a gradient attack needs;
        `runs.Run.apply` takes uint8 only) -> model outputs, evaluation mode."""
        from adaparse_jax.data import pipeline

        return self.model.apply(variables, pipeline.normalize(images), train=False)


def open_run(workdir: str | os.PathLike, step: int | None = None) -> Run:
    """The run's selected (or given) checkpoint via `adaparse_jax.load`, and its data."""
    import adaparse_jax
    from adaparse_jax import train as training

    loaded = adaparse_jax.load(workdir, step)
    return Run(loaded, training.setup_data(loaded.config))


def predict_arrays(fn: Callable, variables, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """`fn(variables, {'image', 'generator'}) -> {name: [B, ...]}` over `images` in padded batches
    (one compiled shape), gathered on the host."""
    import jax.numpy as jnp

    from adaparse_jax import train as training

    batches = ({"image": jnp.asarray(images[i:i + batch_size]),
                "generator": jnp.zeros((len(images[i:i + batch_size]),), jnp.int32)}
               for i in range(0, len(images), batch_size))
    out = training.predict_batches(fn, variables, batches, batch_size)
    out.pop("generator")
    return out


def generator_images(run: Run, names, max_per_generator: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, S, S, 3], label rows of their generators [N]) of the named generators' images from
    the run's cache; at most `max_per_generator` of each, drawn with `seed`."""
    cache = run.data.cache
    records = cache.records(list(names))
    gens = cache.generator[records]
    if max_per_generator is not None:
        rng = np.random.default_rng(seed)
        keep = [rng.permutation(records[gens == g])[:max_per_generator] for g in np.unique(gens)]
        records = np.sort(np.concatenate(keep))
        gens = cache.generator[records]
    return cache.read(records), gens.astype(np.int64)


def labels_of(run: Run) -> np.ndarray:
    """The dataset's true [G, 28] label matrix (also for Random G.T. runs)."""
    return np.asarray(run.data.dataset.labels)


def zoo_manifest(run: Run) -> Mapping | None:
    """The synthetic zoo's manifest.json next to the run's dataset.json, if there is one."""
    import json

    root = run.config.data.get("dataset") or ""
    if not root:
        return None
    root = Path(root)
    path = (root.parent if root.suffix == ".json" else root) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None
