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
that make the files, `BUILD_SOURCES`) is returned as is; an unfinished one with the same settings
resumes, rebuilding only generators without a record; a zoo with other settings is removed and
rebuilt. A non-empty directory that is not a zoo is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import atomic, targets
from adaparse_jax.zoo import photos, schema

ZOO_FORMAT = "adaparse-jax synthetic zoo v1"
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
# Random streams of one zoo seed, besides schema.SCHEMA_STREAM and photos.PHOTO_STREAM.
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM, SPLIT_STREAM = 2, 3, 4, 5
SAMPLE_CHUNK = 50  # images per sampler call; a fixed shape so one compile serves every chunk
MAX_ATTEMPTS = 3  # training runs per generator (the lr halved after a non-finite one)
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


# The modules that make a zoo's files. The others (the CLI, the probe, the package's __init__)
# read zoos and leave them valid when they change; tests/test_zoo.py keeps the two lists complete.
BUILD_SOURCES = ("build.py", "generators.py", "photos.py", "recipes.py", "schema.py")
READER_SOURCES = ("__init__.py", "__main__.py", "probe.py")


def code_hash() -> str:
    """Hash of the modules that make the files (`BUILD_SOURCES`, and `targets.py`, which writes
    the label columns and groups): a zoo made by other code is rebuilt, not reused."""
    digest = hashlib.sha256()
    for name in BUILD_SOURCES:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    digest.update(b"targets.py\0" + Path(targets.__file__).read_bytes())
    return digest.hexdigest()[:16]


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


def zoo_specs(config: ZooConfig) -> list[schema.GeneratorSpec]:
    """The generators of a zoo (sampled from its seed, before anything is built)."""
    from adaparse_jax.zoo import recipes

    return schema.sample_specs(config.generators, config.seed, list(recipes.RECIPES),
                               schema.NUISANCE[config.architectures])


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- one generator
def degrade(x: np.ndarray, kind: str, rng: np.random.Generator, data_range) -> np.ndarray:
    """Conditioning input of an encoder generator: crops [..., 32, 32, 3] in the data range."""
    lo, hi = data_range
    if kind == "identity":
        return x
    if kind == "blur":  # 2x2 box down-sampling and nearest up-sampling: lost detail to restore
        shape = x.shape
        b = x.reshape(*shape[:-3], shape[-3] // 2, 2, shape[-2] // 2, 2, shape[-1]).mean(axis=(-4, -2))
        return np.repeat(np.repeat(b, 2, axis=-3), 2, axis=-2).astype(np.float32)
    if kind == "noise":
        noisy = x + rng.normal(0.0, 0.1 * (hi - lo), x.shape)
        return np.clip(noisy, lo, hi).astype(np.float32)
    if kind == "grayscale":  # colourisation
        return np.repeat(x.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.float32)
    raise ValueError(f"unknown degradation {kind!r}")


def _seed_rng(config: ZooConfig, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream, index])


def _training_data(spec: schema.GeneratorSpec, config: ZooConfig, pools: dict):
    """(real [S, B, 32, 32, 3], inputs [S, B, ...], key) of a generator's training run."""
    import jax

    from adaparse_jax.zoo import generators

    arch = spec.arch
    rng = _seed_rng(config, TRAIN_STREAM, spec.index)
    shape = (config.steps, config.batch)
    real = generators.to_data_range(pools["train"][rng.integers(0, len(pools["train"]), shape)],
                                    arch.nonlin_last)
    if arch.encoder:
        inputs = degrade(real, spec.degradation, rng, generators.DATA_RANGES[arch.nonlin_last])
    else:
        inputs = rng.standard_normal((*shape, arch.latent_dim)).astype(np.float32)
    return real, inputs, jax.random.key(int(rng.integers(2**31)))


def _sample(trainer, state, spec: schema.GeneratorSpec, config: ZooConfig, pools: dict) -> np.ndarray:
    """Raw generator outputs [config.images, 32, 32, 3] in the data range."""
    import jax

    from adaparse_jax.zoo import generators

    arch = spec.arch
    rng = _seed_rng(config, SAMPLE_STREAM, spec.index)
    n = config.images
    if arch.encoder:
        crops = pools["sample"][rng.choice(len(pools["sample"]), n, replace=False)]
        inputs = degrade(generators.to_data_range(crops, arch.nonlin_last), spec.degradation, rng,
                         generators.DATA_RANGES[arch.nonlin_last])
    else:
        inputs = rng.standard_normal((n, arch.latent_dim)).astype(np.float32)
    key = jax.random.key(int(rng.integers(2**31)))
    # Untrained BatchNorm has running statistics 0/1, so it would not normalise: use the batch's.
    # (Without BatchNorm both samplers compute the same; the eval one shares compiled code with
    # the trained zoo through a compilation cache.)
    batch_norm = arch.normalization == "batch"
    sample = trainer.sample_batch_statistics if batch_norm and not config.trained else trainer.sample
    variables = trainer.generator_variables(state)
    chunk = min(SAMPLE_CHUNK, n)
    padded = np.concatenate([inputs, inputs[: (-n) % chunk]]) if n % chunk else inputs
    outputs = [np.asarray(sample(variables, padded[i: i + chunk], jax.random.fold_in(key, i)))
               for i in range(0, len(padded), chunk)]
    return np.concatenate(outputs)[:n]


def build_generator(spec: schema.GeneratorSpec, config: ZooConfig, pools: dict) -> tuple[np.ndarray, dict]:
    """Initialise, train (unless untrained) and sample one generator.

    A run whose losses or samples are not finite is repeated with half the learning rate (from the
    same initial weights and data, so still deterministic), at most MAX_ATTEMPTS times in all; the
    record says how many halvings it took.

    Returns (uint8 images [config.images, 32, 32, 3], record): the record holds the spec in words,
    the raw counts measured on the network and the final training losses.
    """
    from adaparse_jax.zoo import generators, recipes

    arch = spec.arch
    recipe = recipes.RECIPES[spec.recipe]
    trainer = recipes.make_trainer(arch, spec.recipe)
    training = None
    for attempt in range(MAX_ATTEMPTS if config.trained else 1):
        lr_scale = spec.lr_scale * 0.5**attempt
        state = trainer.init_state(_seed_rng(config, INIT_STREAM, spec.index), lr_scale)
        losses = np.zeros((1, len(recipes.LOSS_TERMS)), np.float32)
        if config.trained:
            state, losses = trainer.train(state, *_training_data(spec, config, pools))
        outputs = _sample(trainer, state, spec, config, pools)
        if np.all(np.isfinite(losses)) and np.all(np.isfinite(outputs)):
            break
    else:
        raise FloatingPointError(
            f"generator {spec.name} ({spec.recipe}, {arch}) gives non-finite "
            f"{'losses or samples' if config.trained else 'samples'} even at "
            f"{0.5 ** (MAX_ATTEMPTS - 1):g} x its learning rate")
    if config.trained:
        tail = losses[-max(1, config.steps // 10):].mean(axis=0)
        active = {"total", "reconstruction" if recipe.reconstruction else None,
                  "kl" if recipe.kl else None, "mmd" if recipe.image_mmd or recipe.code_mmd else None,
                  "adversarial" if recipe.adversarial else None,
                  "discriminator" if recipe.adversarial else None}
        training = {
            "steps": config.steps, "batch": config.batch,
            "learning_rate": recipe.learning_rate * lr_scale, "beta1": recipe.beta1,
            "learning_rate_halvings": attempt,
            "final_losses": {k: float(v) for k, v in zip(recipes.LOSS_TERMS, tail) if k in active},
        }
    record = {
        "name": spec.name,
        "index": spec.index,
        **spec.describe(),
        "class_ids": arch.class_ids(),
        "loss_flags": list(recipe.flags),
        "raw_counts": generators.architecture_counts(trainer.generator),
        "training": training,
    }
    return generators.to_uint8(outputs, arch.nonlin_last), record


# ----------------------------------------------------------------------------- workers
_POOLS: dict = {}


def _load_pools(path: str) -> dict:
    if path not in _POOLS:
        with np.load(path) as z:
            _POOLS.clear()
            _POOLS[path] = {region: z[region] for region in photos.REGIONS}
    return _POOLS[path]


def _write_png_folder(folder: Path, images: np.ndarray) -> None:
    """Write images as <k>.png into `folder` via a temporary sibling, renamed when complete."""
    from PIL import Image

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = len(str(len(images) - 1))
    for k, image in enumerate(images):
        Image.fromarray(image, "RGB").save(tmp / f"{k:0{width}d}.png", format="PNG")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to rebuild") from None


def _write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _build_and_write(spec: schema.GeneratorSpec, config: ZooConfig, out: str, pools_path: str) -> dict:
    """Worker task: build one generator, write its PNG folder, then its record (marks it done)."""
    t0, c0 = time.time(), time.process_time()
    images, record = build_generator(spec, config, _load_pools(pools_path))
    out_dir = Path(out)
    _write_png_folder(out_dir / "images" / spec.name, images)
    _write_json(out_dir / ".build" / "records" / f"{spec.name}.json", record)
    return {"name": spec.name, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}


@contextlib.contextmanager
def worker_environment(env: dict) -> Iterator[None]:
    """Set `env` while worker processes start: spawned children read it when they import JAX
    (which happens while unpickling their task, before any initializer could set it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    records = [_read_json(out / ".build" / "records" / f"{n}.json") for n in names]
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
    _write_json(labels / "splits.json", make_splits(names, config.folds, config.seed))
    _write_json(out / "dataset.json", DATASET_JSON)
    manifest = _manifest(config, settings, digest, records, tables, normalisation)
    _write_json(out / "manifest.json", manifest)  # last: its presence marks a finished zoo
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
    if manifest.is_file() and _read_json(manifest).get("settings_hash") == digest:
        return "reuse"
    if state.is_file() and _read_json(state).get("settings_hash") == digest:
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
        return _read_json(out / "manifest.json")

    build = out / ".build"
    (build / "records").mkdir(parents=True, exist_ok=True)
    _write_json(build / "settings.json", {"settings_hash": digest, "settings": settings})
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
            futures = [pool.submit(_build_and_write, s, config, str(out), str(pools_path))
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
    previous = _read_json(log) if log.is_file() else []
    _write_json(log, previous + sorted(times, key=lambda t: t["name"]))
    return manifest
