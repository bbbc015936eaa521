"""What is diagnosed, and the sample it is diagnosed on.

`Subject`: a run's checkpoint with Adam's state (`load_checkpoint`) or a fresh initialisation of a
config (`initialise`); the only code of the package that reads adaparse_jax.train and checkpoints.
The sample: seeded training records (`sample_records`) in device batches (`batches_of`), with one
dropout key per batch (`batch_key`) shared by the gradient and activation passes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


class DiagnoseError(ValueError):
    """A run, checkpoint or option that cannot be diagnosed (one line: what and where)."""


@dataclasses.dataclass
class Subject:
    """What is diagnosed: a config, its data, model variables and (for a checkpoint) Adam's state."""

    config: ml_collections.ConfigDict
    data: Any  # train.RunData: dataset, split, cache, training labels, class weights
    model: Any
    params: Any
    batch_stats: Any
    opt_state: Any  # None on a fresh initialisation
    step: int
    source: dict  # how it was obtained (workdir and checkpoint, or config and dataset)


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> Subject:
    """A run's checkpoint with its optimiser state (default: the selected checkpoint)."""
    from adaparse_jax import checkpointing, models
    from adaparse_jax import train as training

    workdir = Path(workdir).expanduser().resolve()
    if not workdir.is_dir():
        raise DiagnoseError(f"workdir {workdir} does not exist")
    config = training.load_saved_config(workdir)
    selected, why = checkpointing.selected_step(workdir)  # raises when there is no checkpoint
    if step is None:
        step = selected
    else:
        why = "--step"
    model = models.build_model(config.model)
    tx = training.make_optimizer(config)
    size = config.model.image_size
    with checkpointing.Checkpointer(workdir / checkpointing.CHECKPOINTS) as ckpt:
        if step not in ckpt.steps():
            raise DiagnoseError(f"no checkpoint step {step} in {ckpt.directory}; steps: {ckpt.steps()}")
        state, _, _ = ckpt.restore(training.state_shapes(model, tx, (size, size, 3)), step,
                                   model_config=config.model.to_dict())
    data = training.setup_data(config)
    return Subject(config, data, model, state.params, state.batch_stats, state.opt_state,
                   int(state.step), {"workdir": str(workdir), "checkpoint": int(step),
                                     "checkpoint_choice": why})


def initialise(config: ml_collections.ConfigDict, out: str | os.PathLike) -> Subject:
    """A fresh initialisation of `config` (its seed, as training starts); data paths the config
    leaves empty default to `out` (the decoded cache: <out>/cache)."""
    from adaparse_jax import models
    from adaparse_jax import train as training

    training.validate_config(config)
    config = training.resolve_paths(config, Path(out).expanduser().resolve())
    model = models.build_model(config.model)
    size = config.model.image_size
    state = training.init_state(model, training.make_optimizer(config), jax.random.key(config.seed),
                                (size, size, 3))
    data = training.setup_data(config)
    return Subject(config, data, model, state.params, state.batch_stats, None, 0,
                   {"init": "fresh", "seed": int(config.seed), "dataset_path": config.data.dataset
                    or config.data.images})


def loss_fn(subject: Subject):
    """`(variables, batch, *, step, dropout_rng) -> (total, (terms, updates))`: the run's training loss."""
    from adaparse_jax import train as training

    return functools.partial(
        training.training_loss, subject.model,
        label_table=jnp.asarray(subject.data.train_labels, jnp.float32),
        class_weights={k: jnp.asarray(v, jnp.float32) for k, v in subject.data.class_weights.items()},
        loss_config=subject.config.loss)


def flat(tree) -> dict[str, Any]:
    """{'a/b/c': leaf} of a (frozen or not) pytree of dicts."""
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def sample_records(data, n: int, seed: int) -> np.ndarray:
    """`n` record indices (seeded, without replacement) among the training generators' images."""
    records = data.cache.records(data.split.train)
    if n < 1:
        raise DiagnoseError(f"--images {n}: need at least 1 image")
    rng = np.random.default_rng(seed)
    return rng.choice(records, size=min(n, len(records)), replace=False)


def batches_of(data, records: np.ndarray, batch_size: int) -> list[dict]:
    """Device batches {'image' uint8 [B, S, S, 3], 'generator' int32 [B]} of `records`, in order;
    B = min(batch_size, len(records)), and a remainder shorter than B is left out."""
    b = min(batch_size, len(records))
    out = []
    for i in range(0, len(records) - b + 1, b):
        sel = records[i:i + b]
        out.append({"image": jnp.asarray(data.cache.read(sel)),
                    "generator": jnp.asarray(data.cache.generator[sel].astype(np.int32))})
    return out


def batch_key(seed: int, i: int) -> jax.Array:
    """The dropout key of the sample's batch i (the same in the gradient and activation passes)."""
    return jax.random.fold_in(jax.random.key(seed), i)
