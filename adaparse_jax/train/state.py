"""Training state, optimiser, and the pure jitted steps.

`make_train_step(model, tx, loss_config=...)` returns the jitted
`train_step(state, batch, label_table, class_weights) -> (state, metrics)`: one pure function that
normalises the uint8 batch on the device, gathers the labels from the label table, runs the model
with BatchNorm in training mode, computes every loss term and applies one optimiser step. The label
table and the class weights are ARGUMENTS (not constants closed over), so one compiled executable
serves every fold, method and Random G.T. seed of the same model and batch shape. Nothing in it
syncs with the host; metrics stay on the device until a log step fetches them.

With `fused_steps=K` the step takes K batches stacked on a leading axis and runs K optimiser steps
in one `lax.scan` (the same result as K calls); `unroll=True` unrolls it (what a CPU needs).

`make_eval_step(model)` returns `eval_step(variables, batch) -> decisions` (`apply_model`: uint8
images normalised inside, BatchNorm running statistics); `runs.load` builds on the same function.
"""

from __future__ import annotations

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
from adaparse_jax import metrics as metrics_lib
from adaparse_jax import models, targets
from adaparse_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and saves in a checkpoint)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key; step keys are folded in from `step`


def _fen_mask(params):
    """True on the FEN's parameters (`params['fen']`, AdaParse's hypernetwork included)."""
    return {k: jax.tree.map(lambda _: k == "fen", v) for k, v in params.items()}


def _adam_l2(learning_rate, weight_decay, b1, b2, eps, clip_norm=0.0,
             fen_lr_scale=1.0) -> optax.GradientTransformation:
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if fen_lr_scale != 1:
        parts.append(optax.masked(optax.scale(fen_lr_scale), _fen_mask))
    return optax.chain(*parts)


SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int | None = None):
    """The learning rate: `optimizer.learning_rate` as it is (schedule 'constant', the official
    setting), or for 'cosine' a linear warm-up from 0 over `optimizer.warmup_steps` then a cosine
    decay to 0 at `total_steps` (the run's last step; optax's `warmup_cosine_decay_schedule`).
    Without `total_steps` (callers that only need the optimiser state's structure) the rate stays
    at its peak."""
    opt = config.optimizer
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"config field optimizer.schedule={opt.schedule!r}; expected one of {SCHEDULES}")
    if opt.schedule == "constant" or total_steps is None:
        return opt.learning_rate
    warmup = min(opt.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else opt.learning_rate, peak_value=opt.learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, 1), end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient before the moments, as torch's Adam does.

    (AdamW would decouple the decay from the moments; the official code uses torch.optim.Adam with
    `weight_decay`, which is `grad + wd * param` fed through Adam.) The learning rate is a value in
    the optimiser state (`optax.inject_hyperparams`), so it is logged from the state and a schedule
    or a change needs no recompilation.

    Learning options (off by default): `clip_norm` > 0 clips the gradient's global norm first;
    `fen_lr_scale` multiplies the FEN's steps (per-group learning rate; docs/EXPERIMENTS.md);
    `schedule='cosine'` decays the rate over `total_steps` (`learning_rate_schedule`).
    """
    opt = config.optimizer
    return optax.inject_hyperparams(
        _adam_l2, static_args=("weight_decay", "b1", "b2", "eps", "clip_norm", "fen_lr_scale"))(
        learning_rate=learning_rate_schedule(config, total_steps), weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
        eps=opt.eps, clip_norm=opt.clip_norm, fen_lr_scale=opt.fen_lr_scale)


def learning_rate(opt_state) -> jax.Array:
    """The current learning rate held in an optimiser state made by `make_optimizer`."""
    return opt_state.hyperparams["learning_rate"]


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, ...]) -> TrainState:
    """Initialise parameters, BatchNorm statistics and optimiser state (jitted, on the device)."""
    init_rng, state_rng = jax.random.split(rng)

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

    lowered = jax.jit(_init).lower(init_rng)
    # Init runs once; on the CPU backend XLA's optimiser spends tens of seconds on the unrolled
    # random-number code of a model this size for no useful gain.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(init_rng)


def state_shapes(model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...]) -> TrainState:
    """Abstract `TrainState` (shapes and dtypes only, nothing allocated)."""

    def _abstract(key):
        init_rng, state_rng = jax.random.split(key)
        variables = model.init({"params": init_rng, "dropout": init_rng},
                               jnp.zeros((2, *image_shape), jnp.float32), train=False)
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(variables["params"]), rng=state_rng)

    return jax.eval_shape(_abstract, jax.random.key(0))


def param_count(tree) -> int:
    return models.param_count(tree)


def training_loss(model: nn.Module, variables: Mapping, batch: Mapping[str, jax.Array], *,
                  label_table: jax.Array, class_weights: Mapping[str, jax.Array],
                  loss_config: ml_collections.ConfigDict, step, dropout_rng: jax.Array):
    """The loss a training step differentiates, on one batch: `(total, (terms, updates))`.

    BatchNorm in training mode (batch statistics; `updates` holds the new running statistics),
    dropout from `dropout_rng`, every `losses.total_loss` term at optimiser step `step` (the
    constraint ramp reads it). `variables` = {'params', 'batch_stats'}. The train step and
    `adaparse_jax.diagnose` both use it.
    """
    images = pipeline.normalize(batch["image"])
    labels = pipeline.gather_labels(label_table, batch["generator"])
    outputs, updates = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng},
                                   mutable=["batch_stats"])
    total, terms = losses_lib.total_loss(outputs, labels, class_weights, loss_config=loss_config,
                                         step=step)
    return total, (terms, updates)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    loss_config: ml_collections.ConfigDict, fused_steps: int = 1,
                    unroll: int | bool = 1, donate: bool = True) -> Callable:
    """Return the jitted `train_step(state, batch, label_table, class_weights) -> (state, metrics)`.

    Args (of the step):
      label_table: [G, 28] label matrix (`targets.label_matrix`; a run's training labels).
      class_weights: name -> [K] class weights (`targets.class_weights`).
    Args:
      fused_steps: K > 1 makes the step take batches with a leading [K] axis and run K optimiser
        steps in one call; metrics then have a leading [K] axis too.
      unroll: `lax.scan`'s unroll for fused steps (True: one straight-line program). XLA:CPU runs
        convolutions inside a loop body on a slow path (BENCHMARKS.md, "fused steps"), so on a CPU
        fused steps only pay unrolled (`config.fused_unroll`); the rolled loop compiles faster.
      donate: donate the incoming state's buffers (the caller must not reuse them).

    Metrics: 'train/loss/<term>' for every loss term and 'train/loss/total', 'train/grad_norm',
    'train/lr' (the learning rate the step used).
    """

    def one_step(state: TrainState, batch, label_table, class_weights) -> tuple[TrainState, dict]:
        def loss_fn(params):
            return training_loss(model, {"params": params, "batch_stats": state.batch_stats}, batch,
                                 label_table=label_table, class_weights=class_weights,
                                 loss_config=loss_config, step=state.step,
                                 dropout_rng=jax.random.fold_in(state.rng, state.step))

        (_, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=updates.get("batch_stats", state.batch_stats),
                                  opt_state=opt_state)
        metrics = {f"train/loss/{k}": v for k, v in terms.items()}
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/lr"] = learning_rate(state.opt_state)
        return new_state, metrics

    def step_fn(state, batches, label_table, class_weights):
        label_table = jnp.asarray(label_table, jnp.float32)
        class_weights = {k: jnp.asarray(v, jnp.float32) for k, v in class_weights.items()}
        if fused_steps == 1:
            return one_step(state, batches, label_table, class_weights)
        return jax.lax.scan(lambda s, b: one_step(s, b, label_table, class_weights), state, batches,
                            length=fused_steps, unroll=unroll)

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def decisions(outputs: Mapping[str, Any]) -> dict:
    """Model outputs -> flat predictions: `metrics.predictions_from_outputs` (continuous values and
    class ids) plus the official per-class outputs as 'prob/<name>' (flags gated by their group)."""
    out = metrics_lib.predictions_from_outputs(outputs)
    out.update({f"prob/{t.name}": outputs["probs"][t.name] for t in targets.CLASSIFICATION_TARGETS})
    return out


def variables_of(state: TrainState) -> dict:
    """The model variables of a state: {'params', 'batch_stats'} (what `runs.load` restores)."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def check_images(images, size: int | None) -> None:
    """Raise ValueError unless `images` (an array or a tracer) is uint8 [B, size, size, 3], B >= 1.

    Nothing is ever cast: floats in [0, 1] would otherwise become 0 and 1."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    s = shape[1] if size is None and len(shape) == 4 else size
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (s, s, 3) or shape[0] == 0:
        want = f"[B, {size}, {size}, 3]" if size else "[B, S, S, 3]"
        raise ValueError(f"images: expected uint8 {want} with B >= 1 (RGB pixels 0-255), got "
                         f"{dtype.name} {list(shape)}; convert floats in [0, 1] with "
                         "(x * 255).round().astype(np.uint8)")


def apply_model(model: nn.Module, variables: Mapping, images: jax.Array) -> dict:
    """Model outputs of uint8 images [B, S, S, 3]: normalised on the device, BatchNorm running
    statistics, no dropout. Pure; raises ValueError for another shape or dtype (`check_images`)."""
    check_images(images, getattr(model, "image_size", None))
    return model.apply(variables, pipeline.normalize(images), train=False)


def make_eval_step(model: nn.Module) -> Callable:
    """Return the jitted `eval_step(variables, batch) -> outputs` (BatchNorm running statistics,
    no dropout); `variables` = {'params', 'batch_stats'} (`variables_of(state)`).

    Outputs: 'continuous' [B, 9]; for every classification target, 'prob/<name>' [B, K] (the
    official per-class outputs; flags gated by their group) and '<name>' [B] decisions (argmax).
    """

    def eval_step(variables: Mapping, batch) -> dict:
        return decisions(apply_model(model, variables, batch["image"]))

    return jax.jit(eval_step)


def predict_batches(eval_step: Callable, variables: Mapping, batches, batch_size: int) -> dict:
    """Run `eval_step` over device batches; NumPy predictions for every image, in order.

    A short last batch is padded to `batch_size` (BatchNorm uses running statistics, so padding rows
    do not affect the others) so the step compiles for one shape only.

    Returns 'continuous' [M, 9], '<name>' [M] class ids, 'prob/<name>' [M, K], 'generator' [M].
    """
    outs, gens, sizes = [], [], []
    for batch in batches:
        n = int(batch["generator"].shape[0])
        if n < batch_size:
            pad = batch_size - n
            batch = {k: jnp.concatenate([v, jnp.zeros((pad, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        outs.append(eval_step(variables, batch))
        gens.append(batch["generator"])
        sizes.append(n)
    if not outs:
        raise ValueError("no batch to predict")
    outs, gens = jax.device_get((outs, gens))
    result = {k: np.concatenate([o[k][:n] for o, n in zip(outs, sizes)]) for k in outs[0]}
    result["generator"] = np.concatenate([g[:n] for g, n in zip(gens, sizes)]).astype(np.int32)
    return result




def selection_score(metrics: Mapping[str, float]) -> float:
    """The default model-selection score on the validation generators (higher is better).

    (mean macro F1 of the 6 discrete targets + mean macro F1 of the 10 loss flags
     + 1 - mean L1 of the 9 continuous targets) / 3, per image: each part in [0, 1], the three
    families of the papers' tables weighted equally.
    """
    return (metrics["f1/discrete_mean"] + metrics["f1/flags_mean"]
            + 1.0 - metrics["l1/continuous_mean"]) / 3.0
