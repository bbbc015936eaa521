"""Run workdirs for the parse / visualize / convert tests, written without training.

`write_tiny_run(root, arch, manifest)` writes a generated dataset (8 generators, 6 images of 32x32
each, 2 test splits of 2 generators), decodes it into a cache, and writes a run workdir with
`convert.write_run` (config.json + checkpoint step 0 of a randomly initialised tiny model, the
layout train.py writes). With `manifest=True` the dataset also gets a synthetic-zoo manifest.json
naming the classes (`zoo.schema.CLASS_NAMES`) and recording count ranges (`COUNT_RANGES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from adaparse_jax import convert, models, targets
from adaparse_jax import train as training
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data import re116, synthetic
from adaparse_jax.zoo import schema
from adaparse_jax.zoo import settings as zoo_settings

SIZE = 32
# The zoo's form: min and max per count, "parameters" on a log10 scale (10^3 .. 10^6 here).
COUNT_RANGES = {"min": {t.name: 3.0 if t.name == "parameters" else 2.0 + i
                        for i, t in enumerate(targets.CONTINUOUS_TARGETS)},
                "max": {t.name: 6.0 if t.name == "parameters" else 20.0 + 3 * i
                        for i, t in enumerate(targets.CONTINUOUS_TARGETS)},
                "log10": ["parameters"]}


def tiny_config(arch: str = "adaparse") -> ml_collections.ConfigDict:
    config = training.default_config()
    config.model = models.model_config(arch, size="tiny")
    config.split = 1
    config.data.num_val = 1
    config.data.eval_batch_size = 16
    return config


def init_variables(config, seed: int = 0) -> dict:
    """Random variables of the config's model, drawn with NumPy (no compilation): kernels and codes
    He-scaled normal, biases small, BatchNorm scale 1, statistics mean 0 and variance 1."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
        if name in ("scale", "var"):
            return np.ones(s.shape)
        if name in ("bias", "mean"):
            return 0.05 * rng.standard_normal(s.shape) if name == "bias" else np.zeros(s.shape)
        return rng.standard_normal(s.shape)  # the hypernetwork's learned codes

    shapes = models.variable_shapes(config.model)
    return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(np.float32), dict(shapes))


def write_dataset(root: Path, manifest: bool) -> Path:
    ds = synthetic.write_dataset(root / "dataset", num_generators=8, images_per_generator=6,
                                 num_splits=2, test_per_split=2, size=SIZE).parent
    if manifest:
        (ds / "manifest.json").write_text(json.dumps({
            "format": zoo_settings.ZOO_FORMAT,
            "class_names": {k: list(v) for k, v in schema.CLASS_NAMES.items()},
            "count_normalisation": COUNT_RANGES}))
    cache_lib.prepare_dataset(re116.load_dataset(ds), root / "cache",
                              settings=cache_lib.PrepareSettings(size=SIZE), workers=1, progress=False)
    return ds


def write_tiny_run(root: Path, arch: str = "adaparse", manifest: bool = True, seed: int = 0) -> Path:
    """A run workdir `root`/run over `root`/dataset and `root`/cache (see the module docstring)."""
    root = Path(root)
    ds = write_dataset(root, manifest)
    config = tiny_config(arch)
    config.data.dataset = str(ds)
    config.data.cache = str(root / "cache")
    return convert.write_run(config, init_variables(config, seed), root / "run")
