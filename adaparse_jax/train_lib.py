"""Training state, optimiser and the jitted train / eval steps.

`train_step(state, batch) -> (state, metrics)` is one pure function: it normalises the uint8 batch on
the device, gathers the labels from a label table that was uploaded once, runs the model with
BatchNorm in training mode, computes every loss term and applies one Adam step. Nothing in it syncs
with the host; metrics stay on the device until a log step fetches them.

`make_train_step(..., fused_steps=K)` returns a step that takes K batches stacked on a leading axis
and runs K optimiser steps in one `lax.scan`, with the same result as K separate calls: at batch 16
the per-call dispatch otherwise dominates on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adaparse_jax import losses as losses_lib
from adaparse_jax import targets
from adaparse_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and saves in a checkpoint)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key; step keys are folded in from `step`


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient before the moments, as torch's Adam does.

    (AdamW would decouple the decay from the moments; the official code uses torch.optim.Adam with
    `weight_decay`, which is `grad + wd * param` fed through Adam.)
    """
    opt = config.optimizer
    parts = []
    if opt.weight_decay:
        parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    parts.append(optax.scale_by_learning_rate(opt.learning_rate))
    return optax.chain(*parts)


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, ...]) -> TrainState:
    """Initialise parameters, BatchNorm statistics and optimiser state (jitted, on the device)."""
    init_rng, state_rng = jax.random.split(rng)

    @jax.jit
    def _init(key):
        dummy = jnp.zeros((2, *image_shape), jnp.float32)
        p_key, d_key = jax.random.split(key)
        variables = model.init({"params": p_key, "dropout": d_key}, dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return _init(init_rng)


def state_shapes(model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...]) -> TrainState:
    """Abstract `TrainState` (shapes and dtypes only, nothing allocated)."""
    return jax.eval_shape(lambda k: init_state(model, tx, k, image_shape), jax.random.key(0))


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _prepare_batch(batch: Mapping[str, jax.Array], label_table: jax.Array):
    return pipeline.normalize(batch["image"]), pipeline.gather_labels(label_table, batch["generator"])


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    label_table: jax.Array, class_weights: Mapping[str, jax.Array],
                    loss_config: ml_collections.ConfigDict, fused_steps: int = 1,
                    donate: bool = True) -> Callable:
    """Return the jitted `train_step(state, batch) -> (state, metrics)`.

    Args:
      label_table: [G, 28] label matrix on the device (`targets.label_matrix`).
      class_weights: name -> [K] class weights (`targets.class_weights`).
      fused_steps: K > 1 makes the step take batches with a leading [K] axis and run K optimiser
        steps in one call; metrics then have a leading [K] axis too.
      donate: donate the incoming state's buffers (the caller must not reuse them).
    """
    class_weights = {k: jnp.asarray(v, jnp.float32) for k, v in class_weights.items()}
    label_table = jnp.asarray(label_table, jnp.float32)

    def one_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        images, labels = _prepare_batch(batch, label_table)
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            total, terms = losses_lib.total_loss(outputs, labels, class_weights,
                                                 loss_config=loss_config)
            return total, (terms, updates)

        (_, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=updates.get("batch_stats", state.batch_stats),
                                  opt_state=opt_state)
        metrics = {f"train/loss/{k}": v for k, v in terms.items()}
        metrics["train/grad_norm"] = optax.global_norm(grads)
        return new_state, metrics

    if fused_steps == 1:
        step_fn = one_step
    else:
        def step_fn(state, batches):
            return jax.lax.scan(one_step, state, batches, length=fused_steps)

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def decisions(outputs: Mapping[str, Any]) -> dict:
    """Model outputs -> flat predictions: continuous values, per-class probabilities, class ids.

    Class ids are the argmax of the official per-class outputs (`probs`; flags gated by their group).
    """
    out = {"continuous": outputs["continuous"]}
    for t in targets.CLASSIFICATION_TARGETS:
        probs = outputs["probs"][t.name]
        out[f"prob/{t.name}"] = probs
        out[t.name] = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return out


def make_eval_step(model: nn.Module) -> Callable:
    """Return the jitted `eval_step(state, batch) -> outputs` (BatchNorm running statistics, no dropout).

    Outputs: 'continuous' [B, 9]; for every classification target, 'prob/<name>' [B, K] (the
    official per-class outputs; flags gated by their group) and '<name>' [B] decisions (argmax).
    """

    def eval_step(state: TrainState, batch) -> dict:
        images = pipeline.normalize(batch["image"])
        outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                              train=False)
        return decisions(outputs)

    return jax.jit(eval_step)
