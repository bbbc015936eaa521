"""One generator of a zoo, built in a worker process: initialise, train, sample, write its PNGs.

Every generator is built in a spawned worker process with single-threaded XLA on the CPU
(`settings.WORKER_ENV`, set by `worker_environment`), from NumPy/JAX random streams keyed by
(seed, stream, generator index), so neither the number of workers nor the order of completion
changes a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from adaparse_jax import atomic
from adaparse_jax.zoo import photos, schema
from adaparse_jax.zoo.settings import ZooConfig

# Random streams of one zoo seed, besides schema.SCHEMA_STREAM and photos.PHOTO_STREAM.
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM, SPLIT_STREAM = 2, 3, 4, 5
SAMPLE_CHUNK = 50  # images per sampler call; a fixed shape so one compile serves every chunk
MAX_ATTEMPTS = 3  # training runs per generator (the lr halved after a non-finite one)


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


def read_json(path: Path):
    """A JSON file of the zoo or its build state; a corrupt one is named, with the remedy."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to rebuild") from None


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON, atomically (a reader never sees half a file)."""
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def build_and_write(spec: schema.GeneratorSpec, config: ZooConfig, out: str, pools_path: str) -> dict:
    """Worker task: build one generator, write its PNG folder, then its record (marks it done)."""
    t0, c0 = time.time(), time.process_time()
    images, record = build_generator(spec, config, _load_pools(pools_path))
    out_dir = Path(out)
    _write_png_folder(out_dir / "images" / spec.name, images)
    write_json(out_dir / ".build" / "records" / f"{spec.name}.json", record)
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
