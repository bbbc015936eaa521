"""Training: config, state, optimiser, the jitted train / eval steps, and `train_and_evaluate`.

`train_step(state, batch) -> (state, metrics)` is one pure function: it normalises the uint8 batch on
the device, gathers the labels from a label table that was uploaded once, runs the model with
BatchNorm in training mode, computes every loss term and applies one Adam step. Nothing in it syncs
with the host; metrics stay on the device until a log step fetches them.

`make_train_step(..., fused_steps=K)` returns a step that takes K batches stacked on a leading axis
and runs K optimiser steps in one `lax.scan`, with the same result as K separate calls: at batch 16
the per-call dispatch otherwise dominates on a GPU.

`train_and_evaluate(config, workdir)` is the whole run (what `train.py` calls):

1. checks the config (`default_config` lists every field), saves it as `<workdir>/config.json`, and
   refuses a workdir whose saved run used another config;
2. loads the dataset and split, decodes it into the cache if needed, builds the training labels
   (optionally the Random G.T. permutation) and the class weights;
3. restores the latest checkpoint if there is one (model identity checked), else initialises;
4. replicates the state over the data-parallel mesh (`config.devices`), compiles the step once for
   a batch sharded over it, logging parameter count, devices, compiled memory and FLOPs;
5. trains with a progress bar; metrics of log steps are fetched one step late and written to
   `<workdir>/metrics.jsonl` (and TensorBoard when installed); every fetched loss is checked and a
   non-finite one stops the run (`NonFiniteLossError`) before anything is saved;
6. checkpoints every `checkpoint_every_steps` and at each epoch end (state, data position, meta);
   with validation generators, scores the checkpoint on them and keeps the best;
7. at the end evaluates the selected checkpoint on the split's test generators
   (`evaluation.evaluate_run`).

Rerunning the same command in the same workdir resumes from the last checkpoint; on CPU the losses
after a resume are bit-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
from adaparse_jax import models, parallel, targets
from adaparse_jax.data import pipeline

log = logging.getLogger("adaparse_jax.train")

CLASS_WEIGHTS = ("official", "train")
GENERATE = ("", "synthetic", "zoo:tiny", "zoo:demo", "zoo:bench")  # zoo sizes: adaparse_jax.zoo.SIZES
CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
# Testing hook: SIGKILL this process right after dispatching the step that reaches this number, to
# simulate a crash or preemption at an arbitrary point (no cleanup runs, as with a real kill).
CRASH_ENV = "ADAPARSE_JAX_CRASH_AFTER_STEP"
# Fields that may change when a run resumes (they do not change what is computed).
RESUMABLE_FIELDS = ("num_epochs", "max_steps", "log_every_steps", "checkpoint_every_steps",
                    "keep_checkpoints", "eval_at_end", "tensorboard", "progress", "label",
                    "compilation_cache", "devices", "data.loader", "data.workers", "data.prefetch",
                    "data.prepare", "data.prepare_workers", "data.eval_batch_size")


class ConfigError(ValueError):
    """A config that cannot be used: unknown or missing fields, invalid values, another run's workdir."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stopped without saving that state."""


# ------------------------------------------------------------------------------------------------
# Config.


def default_config() -> ml_collections.ConfigDict:
    """Every field a training config has, with the official AdaParse-on-RE-116 values.

    Fields:
      model: `models.model_config` (arch 'adaparse' | 'renet', sizes, ablation switches).
      loss: `losses.default_loss_config` (constraint weights, lambda = 10, ce_input).
      optimizer: Adam with L2 weight decay added to the gradient (torch's Adam): learning_rate,
        weight_decay, b1, b2, eps.
      data.dataset: a dataset.json or its directory (e.g. a synthetic zoo); or
      data.images + data.labels: an RE-116 / RE-123 image root and label directory
        (data.variant 'auto' | 're116' | 're123').
      data.generate: '' | 'synthetic' | 'zoo:<size>': write a generated dataset into data.dataset
        (default <workdir>/dataset) when it does not exist yet; data.generate_seed seeds it.
      data.cache: the decoded cache (default <workdir>/cache); data.prepare: decode into it when it
        is missing (data.prepare_workers processes, 0 = all cores).
      data.num_val, data.val_seed: validation generators held out of the training generators for
        model selection (0: none, the last checkpoint is evaluated).
      data.loader: 'grain' | 'device'; data.workers: grain worker processes; data.prefetch: batches
        in flight to the device; data.eval_batch_size: batch of validation / test passes.
      split: the test split (RE-116: 1-4).
      batch_size, num_epochs, seed (init and shuffle), fused_steps (optimiser steps per call).
      devices: data parallelism (`parallel`). 0 (default): every device of the default backend, what
        a multi-GPU user of train.py expects and the same thing on a 1-device machine; n: the first
        n. Each global batch of batch_size is split over them (batch_size must be a multiple of the
        count) and the state is replicated; the steps compute what one device computes (BatchNorm
        statistics of the global batch), up to float32 summation order. Validation and test
        passes are not split (any eval_batch_size works). A run may resume on another count
        (bit-identical resumes need the same one).
      random_gt, random_gt_seed: the papers' Random G.T. baseline (label rows of the training
        generators permuted; `random_gt_labels`).
      class_weights: 'official' (N / N_c over every generator of the dataset, test ones included:
        reproduces the official literals) | 'train' (over the training generators only).
      official_group_counts: coarse-group weights count the OR of member flags (official).
      log_every_steps, checkpoint_every_steps (also at every epoch end), keep_checkpoints.
      eval_every_epochs: validation cadence (with data.num_val > 0).
      selection_metric, selection_mode: what picks the best checkpoint on the validation generators:
        'score' (see `selection_score`) or any per-image metric name of `metrics.score`, with
        'max' or 'min'.
      max_steps: stop after this many optimiser steps (0: no limit; a rerun continues).
      eval_at_end: evaluate the selected checkpoint on the test generators when training finishes.
      tensorboard: also write TensorBoard events when tensorboardX (or TensorFlow) is installed.
      progress: show a progress bar. label: run label in the eval tables ('' = from arch and
        random_gt). compilation_cache: a persistent XLA compilation cache directory ('' = off).
    """
    c = ml_collections.ConfigDict()
    c.model = models.model_config("adaparse")
    c.loss = losses_lib.default_loss_config()
    c.optimizer = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
             clip_norm=0.0, fen_lr_scale=1.0))
    c.data = ml_collections.ConfigDict(dict(
        dataset="", images="", labels="", variant="auto", generate="", generate_seed=0,
        cache="", prepare=True, prepare_workers=0, num_val=0, val_seed=0,
        loader="grain", workers=0, prefetch=2, eval_batch_size=64))
    c.split = 1
    c.batch_size = 16
    c.num_epochs = 20
    c.seed = 0
    c.fused_steps = 1
    c.devices = 0
    c.random_gt = False
    c.random_gt_seed = 0
    c.class_weights = "official"
    c.official_group_counts = True
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.eval_every_epochs = 1
    c.selection_metric = "score"
    c.selection_mode = "max"
    c.max_steps = 0
    c.eval_at_end = True
    c.tensorboard = True
    c.progress = True
    c.label = ""
    c.compilation_cache = ""
    return c


def _is_group(x) -> bool:
    return isinstance(x, (Mapping, ml_collections.ConfigDict))


def _field_error(path: str, node: Mapping, prefix: str) -> ConfigError:
    name = path.split(".")[-1]
    close = difflib.get_close_matches(name, list(node), n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    where = prefix.rstrip(".") or "config"
    return ConfigError(f"unknown config field {path!r}{hint}\n  valid fields of {where}: "
                       + ", ".join(sorted(node)))


def _check_keys(config: Mapping, reference: Mapping, prefix: str = "") -> None:
    unknown = sorted(set(config) - set(reference))
    if unknown:
        raise _field_error(prefix + unknown[0], reference, prefix)
    missing = sorted(set(reference) - set(config))
    if missing:
        raise ConfigError(f"config is missing field(s) {', '.join(prefix + m for m in missing)}; "
                          "start from train_lib.default_config()")
    for k, v in reference.items():
        if _is_group(v):
            if not _is_group(config[k]):
                raise ConfigError(f"config field {prefix + k} must be a group of fields, got {config[k]!r}")
            _check_keys(config[k], v, prefix + k + ".")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the field for unknown or missing fields and invalid values."""
    _check_keys(config, default_config())

    def fail(field, expected):
        value = config
        for part in field.split("."):
            value = value[part]
        raise ConfigError(f"config field {field}={value!r}; expected {expected}")

    def positive_int(field):
        value = config
        for part in field.split("."):
            value = value[part]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(field, "a positive integer")

    for f in ("batch_size", "num_epochs", "fused_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval_every_epochs", "data.eval_batch_size"):
        positive_int(f)
    if not isinstance(config.max_steps, int) or config.max_steps < 0:
        fail("max_steps", "an integer >= 0 (0: no limit)")
    if config.class_weights not in CLASS_WEIGHTS:
        fail("class_weights", f"one of {CLASS_WEIGHTS}")
    if config.selection_mode not in ("max", "min"):
        fail("selection_mode", "'max' or 'min'")
    if config.data.loader not in pipeline.MODES:
        fail("data.loader", f"one of {pipeline.MODES}")
    if config.data.generate not in GENERATE:
        fail("data.generate", f"one of {GENERATE}")
    if not isinstance(config.data.num_val, int) or config.data.num_val < 0:
        fail("data.num_val", "an integer >= 0")
    if not isinstance(config.devices, int) or isinstance(config.devices, bool) or config.devices < 0:
        fail("devices", "an integer >= 0 (0: every device)")
    data_mesh(config)  # enough devices, and batch_size splits over them
    try:
        models.build_model(config.model)  # the model's own field checks
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from e
    try:
        losses_lib._check_config(config.loss)
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from e


def data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The data-parallel mesh of `config.devices` (0: every device of the default backend).

    Raises ConfigError when there are fewer devices, or batch_size does not split over them.
    """
    available = jax.devices()
    n = config.devices or len(available)
    if n > len(available):
        raise ConfigError(f"config field devices={config.devices!r}; expected at most the "
                          f"{len(available)} {jax.default_backend()} device(s) present (0: all)")
    mesh = parallel.data_mesh(available[:n])
    try:
        parallel.check_batch_size(config.batch_size, mesh)
    except ValueError as e:
        which = f"all {n}" if not config.devices else f"the first {n}"
        raise ConfigError(f"{e} (config field devices={config.devices!r}: {which})") from e
    return mesh


def check_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Raise ConfigError for a `--config.a.b=value` override whose field does not exist.

    The message lists the valid fields at the level where the path breaks, and the closest name.
    """
    for arg in overrides:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, prefix = config, ""
        for part in path.split("."):
            if not _is_group(node) or part not in node:
                if not _is_group(node):
                    raise ConfigError(f"config field {prefix.rstrip('.')!r} is not a group of fields; "
                                      f"cannot set {path!r} (in {arg})")
                err = _field_error(prefix + part, node, prefix)
                raise ConfigError(f"{err} (in {arg})")
            node, prefix = node[part], prefix + part + "."


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file as `train.py --config PATH[:ARG] --config.x=y ...` does.

    Args:
      path: a config file with `get_config(arg=None)`, optionally followed by ':ARG'.
      overrides: command-line overrides such as '--config.split=2'.
    """
    from absl import flags
    from ml_collections import config_flags

    def parse(args):
        argv = ["load_config", f"--config={path}", *args]
        fv = flags.FlagValues()
        # sys_argv: config_flags otherwise finds the override flags in this process's sys.argv.
        config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        return fv.config

    try:
        check_overrides(parse([]), overrides)
        return parse(list(overrides))
    except flags.Error as e:
        raise ConfigError(str(e)) from e


def _normalise(config) -> dict:
    return json.loads(config.to_json() if hasattr(config, "to_json") else json.dumps(config))


def _flat(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def load_saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved in its workdir."""
    path = Path(workdir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _check_and_save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Save the config; refuse a workdir whose run used another config (model or otherwise)."""
    path = workdir / CONFIG_JSON
    new = _normalise(config)
    if path.is_file() and (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        old = _normalise(json.loads(path.read_text()))
        fo, fn = _flat(old), _flat(new)
        diff = [k for k in sorted(set(fo) | set(fn)) if fo.get(k) != fn.get(k)
                and k not in RESUMABLE_FIELDS]
        if diff:
            lines = [f"{k}: saved {fo.get(k, '(absent)')!r}, now {fn.get(k, '(absent)')!r}" for k in diff]
            what = ("its checkpoints are from a different model" if any(k.startswith("model.") for k in diff)
                    else "it holds a run with another config")
            raise ConfigError(
                f"workdir {workdir} cannot continue with this config: {what}:\n  " + "\n  ".join(lines)
                + f"\nuse another --workdir (fields that may change on resume: {', '.join(RESUMABLE_FIELDS)})")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
    tmp.replace(path)


def run_label(config: ml_collections.ConfigDict) -> str:
    """The row label of a run in the report tables: config.label, or the method's name."""
    if config.get("label"):
        return str(config.label)
    name = {"adaparse": "AdaParse", "renet": "RE-Net"}[config.model.arch]
    return f"Random G.T. ({name})" if config.random_gt else name


# ------------------------------------------------------------------------------------------------
# State, optimiser, steps.


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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient before the moments, as torch's Adam does.

    (AdamW would decouple the decay from the moments; the official code uses torch.optim.Adam with
    `weight_decay`, which is `grad + wd * param` fed through Adam.) The learning rate is a value in
    the optimiser state (`optax.inject_hyperparams`), so it is logged from the state and a schedule
    or a change needs no recompilation.
    """
    opt = config.optimizer
    return optax.inject_hyperparams(
        _adam_l2, static_args=("weight_decay", "b1", "b2", "eps", "clip_norm", "fen_lr_scale"))(
        learning_rate=opt.learning_rate, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
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


def _prepare_batch(batch: Mapping[str, jax.Array], label_table: jax.Array):
    return pipeline.normalize(batch["image"]), pipeline.gather_labels(label_table, batch["generator"])


def training_loss(model: nn.Module, variables: Mapping, batch: Mapping[str, jax.Array], *,
                  label_table: jax.Array, class_weights: Mapping[str, jax.Array],
                  loss_config: ml_collections.ConfigDict, step, dropout_rng: jax.Array):
    """The loss a training step differentiates, on one batch: `(total, (terms, updates))`.

    BatchNorm in training mode (batch statistics; `updates` holds the new running statistics),
    dropout from `dropout_rng`, every `losses.total_loss` term at optimiser step `step` (the
    constraint ramp reads it). `variables` = {'params', 'batch_stats'}.
    """
    images, labels = _prepare_batch(batch, label_table)
    outputs, updates = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng},
                                   mutable=["batch_stats"])
    total, terms = losses_lib.total_loss(outputs, labels, class_weights, loss_config=loss_config,
                                         step=step)
    return total, (terms, updates)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    label_table: jax.Array, class_weights: Mapping[str, jax.Array],
                    loss_config: ml_collections.ConfigDict, fused_steps: int = 1,
                    unroll: int | bool = 1, donate: bool = True) -> Callable:
    """Return the jitted `train_step(state, batch) -> (state, metrics)`.

    Args:
      label_table: [G, 28] label matrix on the device (`targets.label_matrix`).
      class_weights: name -> [K] class weights (`targets.class_weights`).
      fused_steps: K > 1 makes the step take batches with a leading [K] axis and run K optimiser
        steps in one call; metrics then have a leading [K] axis too.
      unroll: `lax.scan`'s unroll for fused steps (True: one straight-line program). XLA:CPU runs
        convolutions inside a loop body on a slow path (BENCHMARKS.md, "fused steps"), so on a CPU
        fused steps only pay unrolled; the rolled loop (1, the default) compiles faster.
      donate: donate the incoming state's buffers (the caller must not reuse them).

    Metrics: 'train/loss/<term>' for every loss term and 'train/loss/total', 'train/grad_norm',
    'train/lr' (the learning rate the step used).
    """
    class_weights = {k: jnp.asarray(v, jnp.float32) for k, v in class_weights.items()}
    label_table = jnp.asarray(label_table, jnp.float32)

    def one_step(state: TrainState, batch) -> tuple[TrainState, dict]:
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

    if fused_steps == 1:
        step_fn = one_step
    else:
        def step_fn(state, batches):
            return jax.lax.scan(one_step, state, batches, length=fused_steps, unroll=unroll)

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def decisions(outputs: Mapping[str, Any]) -> dict:
    """Model outputs -> flat predictions: `metrics.predictions_from_outputs` (continuous values and
    class ids) plus the official per-class outputs as 'prob/<name>' (flags gated by their group)."""
    out = metrics_lib.predictions_from_outputs(outputs)
    out.update({f"prob/{t.name}": outputs["probs"][t.name] for t in targets.CLASSIFICATION_TARGETS})
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


def predict_batches(eval_step: Callable, state: TrainState, batches, batch_size: int) -> dict:
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
        outs.append(eval_step(state, batch))
        gens.append(batch["generator"])
        sizes.append(n)
    if not outs:
        raise ValueError("no batch to predict")
    outs, gens = jax.device_get((outs, gens))
    result = {k: np.concatenate([o[k][:n] for o, n in zip(outs, sizes)]) for k in outs[0]}
    result["generator"] = np.concatenate([g[:n] for g, n in zip(gens, sizes)]).astype(np.int32)
    return result


# ------------------------------------------------------------------------------------------------
# Data and labels of a run.


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
        from adaparse_jax.data import synthetic

        synthetic.write_dataset(out, seed=seed)
        return
    import subprocess
    import sys

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


def setup_data(config: ml_collections.ConfigDict, *, prepare: bool | None = None,
               progress: bool = False) -> RunData:
    """Dataset, split, cache (decoded if missing), training labels and class weights of a run.

    `config` must have absolute data paths (`resolve_paths`).
    """
    from adaparse_jax.data import cache as cache_lib
    from adaparse_jax.data import re116

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
        split = re116.make_split(dataset, config.split, d.num_val, d.val_seed)
    except re116.DatasetError as e:
        raise ConfigError(str(e)) from e
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


# ------------------------------------------------------------------------------------------------
# Logging.


class MetricsWriter:
    """`metrics.jsonl` (one JSON object per line) and, when installed, TensorBoard events."""

    def __init__(self, workdir: Path, tensorboard: bool):
        self.path = workdir / METRICS_JSONL
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                try:
                    from flax.metrics import tensorboard as flax_tb

                    self._tb = flax_tb.SummaryWriter(str(workdir / "tensorboard"))
                except ImportError:
                    log.info("TensorBoard: neither tensorboardX nor TensorFlow is installed; "
                             "metrics go to %s only", self.path)

    def truncate(self, step: int) -> None:
        """Drop lines written after `step` (a crashed run's steps that a resume recomputes)."""
        if not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        tmp.replace(self.path)

    def write(self, record: Mapping) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    if hasattr(self._tb, "add_scalar"):
                        self._tb.add_scalar(k, v, step)
                    else:
                        self._tb.scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(workdir) / METRICS_JSONL
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def compiled_stats(compiled) -> dict:
    """Compiled memory (bytes) and FLOPs of one call, where the backend reports them."""
    out = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        mem = None
    if mem is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes"):
            if hasattr(mem, field):
                out[field] = int(getattr(mem, field))
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# Validation and model selection.


def selection_score(metrics: Mapping[str, float]) -> float:
    """The default model-selection score on the validation generators (higher is better).

    (mean macro F1 of the 6 discrete targets + mean macro F1 of the 10 loss flags
     + 1 - mean L1 of the 9 continuous targets) / 3, per image: each part in [0, 1], the three
    families of the papers' tables weighted equally.
    """
    return (metrics["f1/discrete_mean"] + metrics["f1/flags_mean"]
            + 1.0 - metrics["l1/continuous_mean"]) / 3.0


def _validate(config, run: RunData, eval_step, state, loader) -> dict:
    from adaparse_jax import metrics as metrics_lib

    loader.reset()
    preds = predict_batches(eval_step, state, loader, config.data.eval_batch_size)
    # Validation generators are scored against their true labels (also under Random G.T.).
    scores = metrics_lib.score(preds, run.dataset.labels[preds["generator"]])
    scores["score"] = selection_score(scores)
    return scores


# ------------------------------------------------------------------------------------------------
# The run.


def _batches(loader, k: int) -> list:
    return [next(loader) for _ in range(k)]


def _stack(batches: list) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _first_nonfinite(records: Sequence[tuple[int, dict]]) -> tuple[int, list[str], dict] | None:
    for step, m in records:
        bad = [k for k, v in m.items() if k.startswith("train/loss/") and not math.isfinite(v)]
        if bad:
            return step, bad, m
    return None


def _unstack(step_end: int, k: int, metrics: dict) -> list[tuple[int, dict]]:
    """Host metrics of one call -> [(step, {name: float})] for each of its k optimiser steps."""
    if k == 1 and all(np.ndim(v) == 0 for v in metrics.values()):
        return [(step_end, {n: float(v) for n, v in metrics.items()})]
    return [(step_end - k + 1 + i, {n: float(np.asarray(v)[i]) for n, v in metrics.items()})
            for i in range(k)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) the run in `workdir`, then evaluate its selected checkpoint on the test split.

    Returns a summary: final step, whether training finished, steps per epoch, the selected step and
    the test metrics (when evaluated).
    """
    from tqdm.auto import tqdm

    from adaparse_jax import checkpointing

    validate_config(config)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = resolve_paths(config, workdir)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(config.compilation_cache).expanduser()))
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    writer = None
    ckpt = None
    train_loader = val_loader = None
    try:
        _check_and_save_config(config, workdir)
        run = setup_data(config, progress=config.progress)
        split = run.split
        log.info("run %s: %s split %s: %d train, %d validation, %d test generators%s", workdir,
                 run.dataset.name, config.split, len(split.train), len(split.val), len(split.test),
                 " (Random G.T. labels)" if config.random_gt else "")
        model = models.build_model(config.model)
        tx = make_optimizer(config)
        size = config.model.image_size
        image_shape = (size, size, 3)
        B, K = config.batch_size, config.fused_steps
        mesh = data_mesh(config)
        # Training batches reach the step split over the mesh: grain puts each host batch there
        # directly; the device loader keeps its records on every device (each batch is gathered
        # from all of them), and `shard_batch` splits what it gathers.
        train_loader = pipeline.Loader(
            run.cache, split.train, batch_size=B, seed=config.seed, train=True,
            num_epochs=config.num_epochs, mode=config.data.loader, num_workers=config.data.workers,
            prefetch=config.data.prefetch, names=run.dataset.names,
            sharding=parallel.batch_sharding(mesh) if config.data.loader == "grain"
            else parallel.replicated(mesh))
        steps_per_epoch = len(train_loader)
        total = steps_per_epoch * config.num_epochs
        stop = min(total, config.max_steps) if config.max_steps else total

        ckpt = checkpointing.Checkpointer(workdir / checkpointing.CHECKPOINTS,
                                          keep=config.keep_checkpoints, best_mode=config.selection_mode)
        writer = MetricsWriter(workdir, config.tensorboard)
        abstract = state_shapes(model, tx, image_shape)
        model_record = config.model.to_dict()
        if ckpt.latest_step() is not None:
            state, loader_state, meta = ckpt.restore(abstract, model_config=model_record,
                                                     sharding=parallel.replicated(mesh))
            train_loader.set_state(loader_state)
            writer.truncate(int(state.step))
            log.info("resumed from checkpoint step %d (epoch %d)", int(state.step), meta.get("epoch", -1))
        else:
            state = parallel.replicate(init_state(model, tx, jax.random.key(config.seed), image_shape),
                                       mesh)
        start = int(state.step)
        n_params = param_count(state.params)
        log.info("model %s: %s parameters (%s)", config.model.arch, f"{n_params:,}",
                 ", ".join(f"{k} {param_count(v):,}" for k, v in state.params.items()))
        n_devices = mesh.size
        log.info("data parallel over %d %s device(s): batch %d, %d per device; state replicated "
                 "(compiled memory and FLOPs below: per device)",
                 n_devices, jax.default_backend(), B, B // n_devices)

        step_kw = dict(label_table=jnp.asarray(run.train_labels), class_weights=run.class_weights,
                       loss_config=config.loss)
        batch_spec = {"image": ((B, *image_shape), jnp.uint8), "generator": ((B,), jnp.int32)}
        compiled: dict[int, Callable] = {}

        def step_fn(k: int) -> Callable:
            # Compiled once per call length before use (K, and 1 for an epoch's remainder).
            if k not in compiled:
                fn = make_train_step(model, tx, fused_steps=k, **step_kw)
                sharding = parallel.batch_sharding(mesh, fused_steps=k)
                spec = {name: jax.ShapeDtypeStruct(shape if k == 1 else (k, *shape), dtype,
                                                   sharding=sharding)
                        for name, (shape, dtype) in batch_spec.items()}
                t0 = time.perf_counter()
                compiled[k] = fn.lower(state, spec).compile()
                stats = compiled_stats(compiled[k])
                log.info("train step (%d optimiser step%s per call) compiled in %.1f s; memory: %s; "
                         "%s", k, "s" if k > 1 else "", time.perf_counter() - t0,
                         ", ".join(f"{f.replace('_size_in_bytes', '')} {_mib(v)}" for f, v in stats.items()
                                   if f.endswith("bytes")) or "not reported",
                         f"{stats['flops'] / 1e9:.1f} GFLOP per call" if "flops" in stats else "")
            return compiled[k]

        # Evaluation is not split over the mesh: jit runs the replicated state on unsplit batches as
        # they are, so any eval_batch_size and a short last batch work; it is a small share of a run.
        eval_step = make_eval_step(model)
        if split.val:
            val_loader = pipeline.Loader(run.cache, split.val, batch_size=config.data.eval_batch_size,
                                         train=False, mode=config.data.loader,
                                         num_workers=config.data.workers, names=run.dataset.names)
        selection = checkpointing.read_selection(workdir) or {
            "metric": config.selection_metric, "mode": config.selection_mode, "history": []}
        # Entries after the restored step belong to a crashed continuation: they are redone.
        selection["history"] = [h for h in selection["history"] if h["step"] <= start]

        def save(state, *, val: dict | None = None):
            step = int(state.step)
            metrics = None
            if val is not None:
                value = float(val[config.selection_metric])
                metrics = {checkpointing.SELECTION_KEY: value}
                selection["history"].append({"step": step, "value": value})
                selection["best_step"], selection["best_value"] = checkpointing.best_of(
                    selection["history"], config.selection_mode)
                # Written before the checkpoint: a crash in between leaves an entry whose step has
                # no checkpoint, which `selected_step` skips and a resume drops.
                checkpointing.write_selection(workdir, selection)
            ckpt.save(state, loader_state=train_loader.get_state(),
                      meta={"model": model_record, "epoch": step // steps_per_epoch,
                            "param_count": n_params, "label": run_label(config)},
                      metrics=metrics)

        crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
        pending: list[tuple[int, int, dict]] = []  # (last step of the call, k, device metrics)
        log_steps: set[int] = set()
        flush_upto = None  # flush, one call late, the calls up to this step
        timer = {"t": time.perf_counter(), "step": start}
        bar = tqdm(total=stop, initial=start, unit="step", disable=not config.progress,
                   dynamic_ncols=True, desc="train")

        def flush(upto: int) -> None:
            """Fetch the metrics of calls ending at or before `upto`; check them; log the log steps."""
            ready = [p for p in pending if p[0] <= upto]
            if not ready:
                return
            pending[:] = [p for p in pending if p[0] > upto]
            records = [r for end, k, m in ready for r in _unstack(end, k, jax.device_get(m))]
            bad = _first_nonfinite(records)
            if bad is not None:
                step, names, m = bad
                last = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (epoch {(step - 1) // steps_per_epoch}): "
                    + ", ".join(f"{n.removeprefix('train/loss/')}={m[n]}" for n in names)
                    + (f"; the last good checkpoint is step {last} in {ckpt.directory} (the bad state was "
                       "not saved)" if last is not None else "; no checkpoint was saved yet")
                    + ". Lower optimizer.learning_rate or check the data, then rerun (it resumes "
                    "from that checkpoint)")
            now = time.perf_counter()
            for step, m in records:
                if step not in log_steps:
                    continue
                log_steps.discard(step)
                rate = B * (step - timer["step"]) / max(now - timer["t"], 1e-9)
                timer.update(t=now, step=step)
                record = {"step": step, "epoch": (step - 1) // steps_per_epoch, **m,
                          "train/img_per_s": rate}
                writer.write(record)
                bar.set_postfix(loss=f"{m['train/loss/total']:.4g}", img_s=f"{rate:.0f}")

        # Compile before the loop: K optimiser steps per call, and single steps where an epoch (or
        # max_steps) leaves a remainder.
        sizes, s = set(), start
        while s < stop:
            k = min(K, (s // steps_per_epoch + 1) * steps_per_epoch - s, stop - s)
            sizes.add(k if k == K else 1)
            s += k
        for k in sorted(sizes):
            step_fn(k)
        timer.update(t=time.perf_counter())
        step = start
        while step < stop:
            prev = step
            epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
            k = min(K, epoch_end - step, stop - step)
            if k == K:
                batch = _batches(train_loader, k)
                batch = parallel.shard_batch(batch[0] if k == 1 else _stack(batch), mesh, fused_steps=k)
                state, m = step_fn(k)(state, batch)
                pending.append((prev + k, k, m))
            else:  # an epoch's (or max_steps') remainder: single steps
                for i, b in enumerate(_batches(train_loader, k)):
                    state, m = step_fn(1)(state, parallel.shard_batch(b, mesh))
                    pending.append((prev + i + 1, 1, m))
            step = prev + k
            bar.update(k)
            if crash_at and prev < crash_at <= step:
                os.kill(os.getpid(), signal.SIGKILL)
            if flush_upto is not None:  # the previous log call's metrics: ready or nearly
                flush(flush_upto)
                flush_upto = None
            logged = [s for s in range(prev + 1, step + 1)
                      if s % config.log_every_steps == 0 or s == stop]
            if logged:
                log_steps.update(logged)
                flush_upto = step
            at_epoch_end = step % steps_per_epoch == 0
            if (step // config.checkpoint_every_steps > prev // config.checkpoint_every_steps
                    or at_epoch_end or step == stop):
                flush(step)  # every loss up to here is checked before the state is saved
                flush_upto = None
                val = None
                epoch = step // steps_per_epoch
                if val_loader is not None and at_epoch_end and epoch % config.eval_every_epochs == 0:
                    val = _validate(config, run, eval_step, state, val_loader)
                    writer.write({"step": step, "epoch": epoch - 1,
                                  **{f"val/{k}": v for k, v in val.items()}})
                    log.info("epoch %d validation: %s = %.4f", epoch, config.selection_metric,
                             val[config.selection_metric])
                save(state, val=val)
                timer.update(t=time.perf_counter(), step=step)  # img/s measures training only
        flush(stop)
        bar.close()
        ckpt.wait()
        finished = int(state.step) >= total
        summary = {"workdir": str(workdir), "step": int(state.step), "finished": finished,
                   "steps_per_epoch": steps_per_epoch, "total_steps": total,
                   "label": run_label(config)}
        if not finished:
            log.info("stopped at step %d of %d (max_steps); rerun to continue", int(state.step), total)
        elif config.eval_at_end:
            from adaparse_jax import evaluation

            ckpt.close()
            ckpt = None
            result = evaluation.evaluate_run(workdir, eval_step=eval_step)
            summary.update(selected_step=result["step"], selection=result["selection"],
                           test_metrics=result["metrics"])
            log.info("test generators (%s), checkpoint step %d (%s): %s", ", ".join(split.test),
                     result["step"], result["selection"], evaluation.headline(result["metrics"]))
        return summary
    finally:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
        log.removeHandler(handler)
        handler.close()


__all__ = [
    "ConfigError", "NonFiniteLossError", "RunData", "TrainState", "check_overrides", "decisions",
    "default_config", "init_state", "learning_rate", "load_config", "load_saved_config",
    "make_eval_step", "make_optimizer", "make_train_step", "param_count", "predict_batches",
    "random_gt_labels", "read_metrics", "resolve_paths", "run_label", "selection_score", "setup_data",
    "state_shapes", "train_and_evaluate", "training_loss", "validate_config",
]
