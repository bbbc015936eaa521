"""A training run's workdir: its saved config, label, checkpoints, and the public loader.

    import adaparse_jax, jax
    run = adaparse_jax.load("runs/re116_s1")            # the selected checkpoint (step=N: that one)
    fn = jax.jit(run.apply)                              # pure: (variables, uint8 [B, S, S, 3]) -> outputs
    outputs = fn(run.variables, images)                  # {'continuous', 'logits', 'probs', 'fingerprints'}
    parsed = run.parse(images)                           # NumPy in, NumPy decisions and probabilities out

`load` restores the model variables only ({'params', 'batch_stats'}: an Orbax partial restore that
leaves the optimiser state on disk), so a run loads whatever optimiser it was trained with. The
evaluation (`evaluation.evaluate_run`) and `predict` read runs through it.

Layer: above `train` (it reads what a training run wrote), below evaluation and the commands.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaparse_jax import checkpointing, models, targets
from adaparse_jax.train import state as train_state
from adaparse_jax.train.config import load_saved_config, run_label

__all__ = ["BASELINE_LABEL", "RANDOM_GT_PREFIX", "Run", "RunSpec", "load", "load_saved_config",
           "method_rank", "run_label"]
# One name per reference row and one method order, for every table (evaluation, scoring, reports).
BASELINE_LABEL = "Mean/mode predictor"
RANDOM_GT_PREFIX = "Random G.T."
_METHOD_ORDER = ("AdaParse", "RE-Net")


def method_rank(label: str) -> tuple[int, str]:
    """Row order of the tables: AdaParse, RE-Net, other labels, then Random G.T. (by name)."""
    if label in _METHOD_ORDER:
        return _METHOD_ORDER.index(label), label
    return (3 if label.startswith(RANDOM_GT_PREFIX) else 2), label


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run's outputs mean: the target table, the input size, class names where known.

    targets: the `adaparse_jax.targets` module (25 heads, label columns, groups).
    class_names: {discrete target: [name per class id]} from the dataset's manifest.json (the
      synthetic zoo writes them); {} when the dataset does not record them (RE-116: class ids).
    """

    targets: Any
    image_size: int
    class_names: dict


@dataclasses.dataclass(frozen=True)
class Run:
    """A restored run (see `load`)."""

    workdir: Path
    step: int
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict
    spec: RunSpec

    @property
    def apply(self) -> Callable[[Mapping, jax.Array], dict]:
        """`apply(variables, images_uint8) -> outputs`: pure, jit/vmap-able; normalises inside."""
        return functools.partial(train_state.apply_model, self.model)

    @functools.cached_property
    def eval_step(self) -> Callable:
        """The jitted `eval_step(variables, batch) -> decisions` the evaluation uses."""
        return train_state.make_eval_step(self.model)

    def parse(self, images, batch_size: int = 64) -> dict:
        """uint8 images [N, S, S, 3] -> NumPy {'continuous' [N, 9], '<target>' class ids [N],
        'prob/<target>' [N, K]} (the model's decisions; host side, batched)."""
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        train_state.check_images(images, self.spec.image_size)
        batches = ({"image": jnp.asarray(images[i:i + batch_size]),
                    "generator": jnp.full((len(images[i:i + batch_size]),), -1, jnp.int32)}
                   for i in range(0, len(images), batch_size))
        out = train_state.predict_batches(self.eval_step, self.variables, batches, batch_size)
        out.pop("generator")
        return out


def _class_names(config: ml_collections.ConfigDict) -> dict:
    dataset = config.data.get("dataset", "")
    if not dataset:
        return {}
    root = Path(dataset)
    manifest = (root.parent if root.suffix == ".json" else root) / "manifest.json"
    try:
        return {k: list(v) for k, v in json.loads(manifest.read_text()).get("class_names", {}).items()}
    except (OSError, ValueError):
        return {}


def _variable_shapes(model: nn.Module, size: int) -> dict:
    def init(key):
        v = model.init({"params": key, "dropout": key}, jnp.zeros((2, size, size, 3)), train=False)
        return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

    return jax.eval_shape(init, jax.random.key(0))


def load(workdir: str | os.PathLike, step: int | None = None) -> Run:
    """Restore a training run for inference.

    Args:
      workdir: the run's directory (`train.py --workdir`).
      step: a checkpoint step; None: the run's selected checkpoint (best by validation score when
        it had validation generators, else the latest).

    Raises FileNotFoundError (no workdir, no checkpoint, unknown step) and
    `checkpointing.CheckpointMismatchError` (a checkpoint of another model), each one line.
    """
    workdir = Path(workdir).expanduser().resolve()
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir}: no such run directory")
    config = load_saved_config(workdir)
    if step is None:
        step, _ = checkpointing.selected_step(workdir)
    model = models.build_model(config.model)
    size = config.model.image_size
    with checkpointing.Checkpointer(workdir / checkpointing.CHECKPOINTS) as ckpt:
        variables = ckpt.restore_variables(_variable_shapes(model, size), step,
                                           model_config=config.model.to_dict())
    spec = RunSpec(targets=targets, image_size=size, class_names=_class_names(config))
    return Run(workdir=workdir, step=int(step), config=config, model=model, variables=variables,
               spec=spec)
