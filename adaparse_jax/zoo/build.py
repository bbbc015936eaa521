"""Build a synthetic generator zoo into the RE-116 dataset layout (docs/ARCHITECTURE.md).

    python -m adaparse_jax.zoo build --size tiny --out runs/zoo_tiny [--untrained] [--seed S] [--workers N]

Output (`OUT`):

    images/<NAME>/<k>.png           32x32 RGB PNGs, one folder per generator
    labels/ground_truth_net_15dim.npy   [G, 15] float64: 9 min-max normalised counts, 6 class ids
    labels/ground_truth_loss_10dim.npy  [G, 10] loss flags; ..._loss_3dim.npy [G, 3] coarse groups
    labels/models.txt               generator names in label-row order
    labels/splits.json              {"test_splits": {"1": [names], ...}}: k folds by generator
    dataset.json                    the dataset description (paths relative to OUT)
    manifest.json                   settings (+ their hash), class names, recipes, count
                                    normalisation, library versions, and every generator's
                                    hyperparameters in words, raw counts and final training losses
    .build/                         build state: settings, one record per finished generator, times
    .lock                           held (flock) while a build writes the directory

Determinism: the same settings (size, seed, trained or not, library versions) give byte-identical
PNGs and label tables on the same kind of CPU. Every generator is built in a spawned worker process
with single-threaded XLA on the CPU, from NumPy/JAX random streams keyed by (seed, stream,
generator index), so neither the number of workers nor the order of completion changes a file.

Reuse: a finished zoo whose settings hash matches (the settings include a hash of the modules
that make the files, `settings.BUILD_SOURCES`) is returned as is; an unfinished one with the same
settings resumes, rebuilding only generators without a record; a zoo with other settings is
removed and rebuilt. A non-empty directory that is not a zoo is refused.

This module drives a build and assembles the label tables, splits and manifest; `settings` holds
the settings and their hash, `worker` builds one generator in a worker process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import atomic, targets
from adaparse_jax.zoo import photos, schema
from adaparse_jax.zoo.settings import (
    WORKER_ENV,
    ZOO_FORMAT,
    ZooConfig,
    settings_hash,
    settings_of,
)
from adaparse_jax.zoo.worker import (
    SPLIT_STREAM,
    build_and_write,
    read_json,
    worker_environment,
    write_json,
)

NET_FILE = "ground_truth_net_15dim.npy"
LOSS10_FILE = "ground_truth_loss_10dim.npy"
LOSS3_FILE = "ground_truth_loss_3dim.npy"
DATASET_JSON = {
    "images": "images",
    "names": "labels/models.txt",
    "splits": "labels/splits.json",
    "labels": {targets.NET_TABLE: f"labels/{NET_FILE}",
               targets.LOSS10_TABLE: f"labels/{LOSS10_FILE}",
               targets.LOSS3_TABLE: f"labels/{LOSS3_FILE}"},
}


def zoo_specs(config: ZooConfig) -> list[schema.GeneratorSpec]:
    """The generators of a zoo (sampled from its seed, before anything is built)."""
    from adaparse_jax.zoo import recipes

    return schema.sample_specs(config.generators, config.seed, list(recipes.RECIPES),
                               schema.NUISANCE[config.architectures])


# ----------------------------------------------------------------------------- assembly
def make_splits(names: Sequence[str], folds: int, seed: int) -> dict:
    """k folds by generator: a seeded permutation cut into near-equal parts, each sorted."""
    rng = np.random.default_rng([seed, SPLIT_STREAM])
    order = [names[i] for i in rng.permutation(len(names))]
    parts = np.array_split(np.arange(len(order)), folds)
    return {"test_splits": {str(f + 1): schema.sort_names([order[i] for i in part])
                            for f, part in enumerate(parts)}}


def label_tables(records: Sequence[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """The three official tables (rows in `records` order) and the count normalisation."""
    from adaparse_jax.zoo import generators, recipes

    g = len(records)
    raw = np.array([[r["raw_counts"][name] for name in generators.COUNT_NAMES] for r in records],
                   np.float64)
    counts, normalisation = generators.normalise_counts(raw)
    net = np.zeros((g, targets.TABLE_COLUMNS[targets.NET_TABLE]), np.float64)
    for j, t in enumerate(targets.CONTINUOUS_TARGETS):
        net[:, t.column] = counts[:, j]
    for t in targets.DISCRETE_TARGETS:
        net[:, t.column] = [r["class_ids"][t.name] for r in records]
    loss10 = np.stack([recipes.RECIPES[r["recipe"]].flag_vector() for r in records])
    loss3 = recipes.group_vector(loss10).astype(np.float64)
    return {targets.NET_TABLE: net, targets.LOSS10_TABLE: loss10, targets.LOSS3_TABLE: loss3}, normalisation


def _manifest(config: ZooConfig, settings: dict, digest: str, records: Sequence[dict],
              tables: dict, normalisation: dict) -> dict:
    from adaparse_jax.zoo import generators, recipes

    per_generator = []
    for row, r in enumerate(records):
        per_generator.append(dict(
            r, row=row,
            normalised_counts={t.name: float(tables[targets.NET_TABLE][row, t.column])
                               for t in targets.CONTINUOUS_TARGETS}))
    return {
        "format": ZOO_FORMAT,
        "settings_hash": digest,
        "settings": settings,
        "seed": config.seed,
        "trained": config.trained,
        "num_generators": len(records),
        "images_per_generator": config.images,
        "class_names": {k: list(v) for k, v in schema.CLASS_NAMES.items()},
        "data_ranges": {k: list(v) for k, v in generators.DATA_RANGES.items()},
        "recipes": {name: {"description": r.description, "flags": list(r.flags)}
                    for name, r in recipes.RECIPES.items()},
        "loss_groups": {g.name: list(g.members) for g in targets.GROUPS},
        "loss_group_rule": "loss3 column = OR of the group's member flags (targets.GROUPS)",
        "count_normalisation": normalisation,
        "generators": per_generator,
    }


def _assemble(out: Path, config: ZooConfig, settings: dict, digest: str,
              specs: Sequence[schema.GeneratorSpec]) -> dict:
    """Label tables, names, splits, dataset.json and manifest.json from the generator records."""
    names = schema.sort_names([s.name for s in specs])
    records = [read_json(out / ".build" / "records" / f"{n}.json") for n in names]
    tables, normalisation = label_tables(records)
    targets.label_matrix(tables)  # raises, naming table/row/column, on any invalid value
    for key, table in tables.items():
        targets.check_table(key, table, num_rows=len(names), source=str(out), names=names)
    labels = out / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for key, file in ((targets.NET_TABLE, NET_FILE), (targets.LOSS10_TABLE, LOSS10_FILE),
                      (targets.LOSS3_TABLE, LOSS3_FILE)):
        np.save(labels / file, tables[key])
    (labels / "models.txt").write_text("".join(n + "\n" for n in names))
    write_json(labels / "splits.json", make_splits(names, config.folds, config.seed))
    write_json(out / "dataset.json", DATASET_JSON)
    manifest = _manifest(config, settings, digest, records, tables, normalisation)
    write_json(out / "manifest.json", manifest)  # last: its presence marks a finished zoo
    return manifest


# ----------------------------------------------------------------------------- driver
_MANAGED = ("images", "labels", ".build", "dataset.json", "manifest.json")
LOCK_FILE = ".lock"


def _generator_done(out: Path, name: str, images: int) -> bool:
    folder = out / "images" / name
    return ((out / ".build" / "records" / f"{name}.json").is_file() and folder.is_dir()
            and sum(1 for _ in folder.glob("*.png")) == images)


def _prepare_directory(out: Path, digest: str) -> str:
    """'reuse' | 'resume' | 'fresh'; removes a zoo built with other settings."""
    manifest, state = out / "manifest.json", out / ".build" / "settings.json"
    if manifest.is_file() and read_json(manifest).get("settings_hash") == digest:
        return "reuse"
    if state.is_file() and read_json(state).get("settings_hash") == digest:
        return "resume"
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        if not (manifest.is_file() or state.is_file()):
            raise FileExistsError(f"{out} is not empty and holds no zoo (no manifest.json or "
                                  ".build/settings.json); refusing to overwrite it")
        for name in _MANAGED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return "fresh"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an flock on OUT/.lock: two builds writing one zoo would delete each other's state."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as handle:  # "a": a reused zoo's files keep their mtimes
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another zoo build is writing {out}; wait for it or choose "
                               "another --out") from None
        yield


def build_zoo(out_dir: str | os.PathLike, config: ZooConfig, workers: int | None = None,
              progress: bool = True, compilation_cache: str | os.PathLike | None = None) -> dict:
    """Build (or reuse, or resume) the zoo of `config` in `out_dir`; returns its manifest.

    Args:
      workers: worker processes (default: the CPU count), each single-threaded.
      progress: show a tqdm bar.
      compilation_cache: a directory for JAX's persistent compilation cache, shared by the
        workers: a rebuild (another seed, the untrained twin's BatchNorm-free samplers, a resumed
        build) then skips compiles already done. Not part of the settings: it changes no file.
    """

    out = Path(out_dir)
    with _exclusive(out):
        return _build_locked(out, config, workers, progress, compilation_cache)


def _build_locked(out: Path, config: ZooConfig, workers: int | None, progress: bool,
                  compilation_cache) -> dict:
    settings = settings_of(config)
    digest = settings_hash(settings)
    specs = zoo_specs(config)
    mode = _prepare_directory(out, digest)
    if mode == "reuse" and all(_generator_done(out, s.name, config.images) for s in specs):
        return read_json(out / "manifest.json")

    build = out / ".build"
    (build / "records").mkdir(parents=True, exist_ok=True)
    write_json(build / "settings.json", {"settings_hash": digest, "settings": settings})
    (out / "manifest.json").unlink(missing_ok=True)
    pending = [s for s in specs if not _generator_done(out, s.name, config.images)]
    times = []
    if pending:
        pools_path = build / "crops.npz"
        if not pools_path.is_file():
            pools = dict(train=photos.crop_pool(config.train_crops, "train", config.seed),
                         sample=photos.crop_pool(config.sample_crops, "sample", config.seed))
            atomic.write(pools_path, lambda f: np.savez(f, **pools))
        workers = max(1, min(workers or os.cpu_count() or 1, len(pending)))
        from tqdm.auto import tqdm

        env = dict(WORKER_ENV)
        if compilation_cache is not None:
            env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        with worker_environment(env), concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(build_and_write, s, config, str(out), str(pools_path))
                       for s in pending]
            label = f"zoo {config.size} ({'trained' if config.trained else 'untrained'})"
            with tqdm(total=len(specs), initial=len(specs) - len(pending), desc=label,
                      unit="gen", disable=not progress) as bar:
                try:
                    for future in concurrent.futures.as_completed(futures):
                        times.append(future.result())
                        bar.update(1)
                except BaseException:
                    # Finished generators keep their records (a rerun resumes); queued ones stop.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        pools_path.unlink()
    manifest = _assemble(out, config, settings, digest, specs)
    log = build / "times.json"
    previous = read_json(log) if log.is_file() else []
    write_json(log, previous + sorted(times, key=lambda t: t["name"]))
    return manifest
