"""The data of a run: dataset, split, decoded cache, training labels (true or Random G.T.) and
class weights, from the config's data fields (generating the dataset first when asked)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from adaparse_jax import targets
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data import re116, synthetic
from adaparse_jax.train.config import ConfigError

log = logging.getLogger("adaparse_jax.train")


def random_gt_labels(labels: np.ndarray, rows: Sequence[int], seed: int) -> np.ndarray:
    """The Random G.T. baseline's label table: the rows of `rows` permuted among themselves.

    Each training generator gets another training generator's label row (a seeded permutation), so
    its images no longer carry information about its labels while the label distribution stays the
    same; rows outside `rows` (validation and test generators) keep their true labels, which is what
    the baseline is evaluated against.
    """
    rows = np.asarray(rows, np.int64)
    out = np.array(labels, copy=True)
    out[rows] = np.asarray(labels)[rows[np.random.default_rng(seed).permutation(len(rows))]]
    return out


@dataclasses.dataclass
class RunData:
    """What a run reads: dataset, split, cache, the training label table and class weights."""

    dataset: Any  # data.re116.Dataset
    split: Any  # data.re116.Split
    cache: Any  # data.cache.Cache
    train_labels: np.ndarray  # [G, 28]: true labels, or the Random G.T. permutation
    class_weights: dict


def _generate(kind: str, out: Path, seed: int) -> None:
    """Write a generated dataset: this package's synthetic one, or the zoo's (its CLI)."""
    if kind == "synthetic":
        synthetic.write_dataset(out, seed=seed)
        return
    size = kind.split(":", 1)[1]
    cmd = [sys.executable, "-m", "adaparse_jax.zoo", "build", "--size", size, "--out", str(out)]
    log.info("building the synthetic zoo: %s", " ".join(cmd))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (out / "dataset.json").is_file():
        raise ConfigError(f"data.generate={kind!r}: `{' '.join(cmd)}` failed (exit {done.returncode}); "
                          "use data.generate='synthetic' or a prepared dataset")


def resolve_paths(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """A copy of `config` with the data paths absolute (defaults under the workdir filled in)."""
    config = ml_collections.ConfigDict(config.to_dict())
    d = config.data
    if d.generate and not d.dataset:
        d.dataset = str(workdir / "dataset")
    if not d.cache:
        d.cache = str(workdir / "cache")
    for field in ("dataset", "images", "labels", "cache"):
        if d[field]:
            d[field] = str(Path(d[field]).expanduser().resolve())
    return config


def load_split(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(dataset, split) of a run, without touching its cache (generated first when configured)."""
    d = config.data
    if d.generate and not (Path(d.dataset) / "dataset.json").is_file():
        log.info("generating dataset %r in %s", d.generate, d.dataset)
        _generate(d.generate, Path(d.dataset), d.generate_seed)
    try:
        if d.dataset:
            if d.images or d.labels:
                raise ConfigError("config.data: give data.dataset or data.images + data.labels, not both")
            dataset = re116.load_dataset(d.dataset)
        elif d.images and d.labels:
            dataset = re116.load_dataset(images=d.images, labels=d.labels, variant=d.variant)
        else:
            raise ConfigError("config.data: no dataset; set data.dataset (a dataset.json or its "
                              "directory), or data.images and data.labels (RE-116 image root and "
                              "label directory), or data.generate")
        return dataset, re116.make_split(dataset, config.split, d.num_val, d.val_seed)
    except re116.DatasetError as e:
        raise ConfigError(str(e)) from e


def setup_data(config: ml_collections.ConfigDict, *, prepare: bool | None = None,
               progress: bool = False) -> RunData:
    """Dataset, split, cache (decoded if missing), training labels and class weights of a run.

    `config` must have absolute data paths (`resolve_paths`).
    """
    d = config.data
    dataset, split = load_split(config)
    cache_dir = Path(d.cache)
    if not (cache_dir / cache_lib.MANIFEST).is_file():
        if not (d.prepare if prepare is None else prepare):
            raise ConfigError(f"config.data.cache: {cache_dir} is not a prepared cache; run "
                              f"python -m adaparse_jax.prepare, or set data.prepare=True")
        log.info("decoding %s into the cache %s", dataset.name, cache_dir)
        cache_lib.prepare_dataset(dataset, cache_dir,
                                  settings=cache_lib.PrepareSettings(size=config.model.image_size),
                                  workers=d.prepare_workers or None, progress=progress)
    cache = cache_lib.Cache(cache_dir)
    if cache.size != config.model.image_size:
        raise ConfigError(f"config.data.cache: {cache_dir} holds {cache.size}x{cache.size} images but "
                          f"model.image_size is {config.model.image_size}; use another cache directory")
    if cache.names is not None and tuple(cache.names) != tuple(dataset.names):
        raise ConfigError(f"config.data.cache: {cache_dir} was prepared from another dataset "
                          f"({cache.settings.get('dataset')!r}); use another cache directory")
    labels = dataset.labels
    if config.random_gt:
        labels = random_gt_labels(labels, dataset.rows(split.train), config.random_gt_seed)
    rows = None if config.class_weights == "official" else dataset.rows(split.train)
    weights = targets.class_weights(labels, rows, official_group_counts=config.official_group_counts)
    return RunData(dataset, split, cache, labels, weights)
