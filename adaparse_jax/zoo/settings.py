"""The settings of a zoo (`ZooConfig`, the `SIZES` presets) and their hash.

Everything that determines a zoo's files enters `settings_of`: the config's fields, the recipes
and photographs, the workers' environment, library versions, and `code_hash`, a hash of the
modules that make the files. A zoo whose manifest holds the same `settings_hash` is reused.
This module is not in `code_hash` itself: what it defines enters the settings as values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path

from adaparse_jax import targets
from adaparse_jax.zoo import photos, schema

ZOO_FORMAT = "adaparse-jax synthetic zoo v1"
WORKER_ENV = {
    # Single-threaded XLA per worker (the zoo prototype measured about 2x the throughput of one
    # two-thread process on this project's CPU), and the same numerics whatever the core count.
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "JAX_PLATFORMS": "cpu",
    "OMP_NUM_THREADS": "1",
}
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "scikit-image", "pillow")


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Settings of one zoo. Everything here enters the settings hash.

    Attributes:
      size: the preset it came from ("tiny", "demo", "bench", or "custom").
      generators: number of generators G.
      images: images sampled per generator.
      steps: training steps per generator (ignored when not trained).
      batch: training batch size.
      folds: k of the k-fold split by generator (`splits.json`).
      architectures: nuisance choices, "full" or "small" (`schema.NUISANCE`).
      trained: False builds the untrained twin (same architectures, labels and initial weights).
      seed: the zoo seed.
      train_crops, sample_crops: sizes of the two crop pools (`photos.crop_pool`).
    """

    size: str
    generators: int
    images: int
    steps: int
    batch: int = 16
    folds: int = 5
    architectures: str = "full"
    trained: bool = True
    seed: int = 0
    train_crops: int = 8192
    sample_crops: int = 4096

    def __post_init__(self):
        for name in ("generators", "images", "steps", "batch", "train_crops", "sample_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZooConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.folds <= self.generators:
            raise ValueError(f"ZooConfig.folds must be in 2..generators ({self.generators}), "
                             f"got {self.folds}")
        if self.architectures not in schema.NUISANCE:
            raise ValueError(f"ZooConfig.architectures={self.architectures!r}; expected one of "
                             f"{sorted(schema.NUISANCE)}")
        if self.images > self.sample_crops:
            raise ValueError(f"ZooConfig.images ({self.images}) exceeds sample_crops "
                             f"({self.sample_crops}): conditioning crops are drawn without "
                             "replacement")


# Measured build times (2 workers on this project's 2-core CPU) are in the README's zoo section.
SIZES = {
    # The test suite's zoo: the smallest architectures and a few steps, since compiling dominates.
    "tiny": dict(generators=24, images=32, steps=10, folds=4, architectures="small"),
    "demo": dict(generators=60, images=100, steps=100, folds=5),
    "bench": dict(generators=240, images=200, steps=150, folds=5),
}


def zoo_config(size: str = "tiny", **overrides) -> ZooConfig:
    """The preset `size` with field overrides (e.g. trained=False, seed=3, generators=12)."""
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(SIZES)}")
    fields = dict(SIZES[size], **overrides)
    return ZooConfig(size=size if not set(overrides) - {"trained", "seed"} else "custom", **fields)


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


# The modules that make a zoo's files. The others (these settings, whose content enters the
# settings as values; the CLI, the probe, the package's __init__) leave built zoos valid when they
# change; tests/test_zoo.py keeps the two lists complete.
BUILD_SOURCES = ("build.py", "generators.py", "photos.py", "recipes.py", "schema.py", "worker.py")
OTHER_SOURCES = ("__init__.py", "__main__.py", "probe.py", "settings.py")
# Source hashes (`source_hash`) of code known to make the same files as an earlier version, mapped
# to that version's code hash, so that zoos built before a change that moved code without changing
# what it computes are reused. A row is added only after building a zoo with both versions and
# finding every file identical; any later edit of a hashed module gives a new source hash.
SAME_FILES_AS = {
    # build.py split into settings.py, worker.py and build.py (code moved, not changed).
    "790c35690dcd38df": "9c0f5c67004bb246",
}


def source_hash() -> str:
    """Hash of the modules that make the files (`BUILD_SOURCES`, and `targets.py`, which writes
    the label columns and groups)."""
    digest = hashlib.sha256()
    for name in BUILD_SOURCES:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    digest.update(b"targets.py\0" + Path(targets.__file__).read_bytes())
    return digest.hexdigest()[:16]


def code_hash() -> str:
    """The code's part of the settings: `source_hash`, or the earlier hash it makes the same files
    as (`SAME_FILES_AS`). A zoo made by other code is rebuilt, not reused."""
    current = source_hash()
    return SAME_FILES_AS.get(current, current)


def settings_of(config: ZooConfig) -> dict:
    """Everything that determines the zoo's files (the hash input)."""
    from adaparse_jax.zoo import recipes

    return {
        "format": ZOO_FORMAT,
        "code": code_hash(),
        "config": dataclasses.asdict(config),
        "recipes": list(recipes.RECIPES),
        "photographs": list(photos.PHOTOGRAPHS),
        "scales": list(photos.SCALES),
        "train_fraction": photos.TRAIN_FRACTION,
        "worker_env": WORKER_ENV,
        "library_versions": library_versions(),
    }


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

