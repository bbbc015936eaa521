"""The training config: schema (`default_config` lists every field), validation, loading with
command-line overrides (`apply_overrides`: `--config.x=y` on any config), the config a workdir saved,
and a run's label.

A config file is a Python file with `get_config(arg=None)` (ml_collections); `load_config(path,
overrides)` reads it as `train.py --config PATH --config.x=y` does, refusing unknown fields with the
valid ones listed. `validate_config` checks every value before anything runs, so a typo fails up
front instead of after the first epoch.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import ml_collections
from ml_collections.config_dict import placeholder

from adaparse_jax import atomic, models, parallel
from adaparse_jax import losses as losses_lib
from adaparse_jax import metrics as metrics_lib
from adaparse_jax.data import pipeline
from adaparse_jax.train import state as state_lib
from adaparse_jax.train.recipes import RECIPES

CLASS_WEIGHTS = ("official", "train")
SELECTION_MODES = ("max", "min")
FUSED_UNROLL = ("auto", "unrolled", "rolled")
GENERATE = ("", "synthetic", "zoo:tiny", "zoo:demo", "zoo:bench")  # zoo sizes: adaparse_jax.zoo.SIZES
CONFIG_JSON = "config.json"
DISTRIBUTED_ENV = "ADAPARSE_DISTRIBUTED"  # 'auto': jax.distributed.initialize() from the launcher
DISTRIBUTED_FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
# Fields that may change when a run resumes (they do not change what is computed).
RESUMABLE_FIELDS = ("num_epochs", "max_steps", "log_every_steps", "checkpoint_every_steps",
                    "keep_checkpoints", "eval_at_end", "tensorboard", "progress", "label",
                    "compilation_cache", "devices", "fused_unroll", "data.loader", "data.workers",
                    "data.prefetch", "data.prepare", "data.prepare_workers", "data.eval_batch_size",
                    "distributed.auto", *(f"distributed.{f}" for f in DISTRIBUTED_FIELDS))
# Fields added after runs were saved without them, with the value that reproduces those runs.
ADDED_FIELDS = {"optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                "model.parser_spectrum_heads": False, "model.parser_spectrum_channels": "mean",
                "model.fen_final_init": "kaiming", "model.parser_spectrum_input": "fingerprint"}


class ConfigError(ValueError):
    """A config that cannot be used: unknown or missing fields, invalid values, another run's workdir."""


def default_config() -> ml_collections.ConfigDict:
    """Every field a training config has, with the official AdaParse-on-RE-116 values.

    Fields:
      model: `models.model_config` (arch 'adaparse' | 'renet', sizes, ablation switches).
      loss: `losses.default_loss_config` (constraint weights, lambda = 10, ce_input).
      optimizer: Adam with L2 weight decay added to the gradient (torch's Adam): learning_rate,
        weight_decay, b1, b2, eps; clip_norm (0: off), fen_lr_scale (1: one learning rate);
        schedule 'constant' (official) | 'cosine' (warm-up over warmup_steps, then cosine decay to
        0 at the run's last step).
      recipe: the training recipe the config was made with (`train.recipes`: 'official', the
        default, or 'improved'); set by `recipes.apply_recipe`, it names the run in tables.
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
      fused_unroll: how `lax.scan` runs the fused steps: 'auto' (default: unrolled on a CPU, where
        XLA:CPU runs convolutions inside a loop body on a slow path, BENCHMARKS.md "fused steps",
        rolled elsewhere), 'unrolled' or 'rolled'.
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
        'score' (see `state.selection_score`) or any per-image metric name of `metrics.score`, with
        'max' or 'min' (an error 'l1/...' with 'max' is refused: it would select the worst).
      max_steps: stop after this many optimiser steps (0: no limit; a rerun continues).
      eval_at_end: evaluate the selected checkpoint on the test generators when training finishes.
      tensorboard: also write TensorBoard events when tensorboardX (or TensorFlow) is installed.
      progress: show a progress bar. label: run label in the eval tables ('' = from arch and
        random_gt). compilation_cache: a persistent XLA compilation cache directory ('' = off).
      distributed: several processes (one per host) training one run with JAX's multi-process
        runtime (`jax.distributed.initialize`; README "Several hosts"). Off by default (one
        process). distributed.auto=True, or the environment variable ADAPARSE_DISTRIBUTED=auto:
        initialise with no arguments (SLURM and the other launchers JAX knows say the rest).
        Otherwise distributed.coordinator_address ('host:port' of process 0) turns it on, with
        num_processes, process_id and local_device_ids (this process's devices) where the
        environment does not say them. The mesh then spans every process's devices (devices must be
        0), each process reads its rows of every global batch, and process 0 alone writes the
        workdir's files other than the checkpoints (which every process writes and reads).
    """
    c = ml_collections.ConfigDict()
    c.model = models.model_config("adaparse")
    c.loss = losses_lib.default_loss_config()
    c.optimizer = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
             clip_norm=0.0, fen_lr_scale=1.0, schedule="constant", warmup_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        dataset="", images="", labels="", variant="auto", generate="", generate_seed=0,
        cache="", prepare=True, prepare_workers=0, num_val=0, val_seed=0,
        loader="grain", workers=0, prefetch=2, eval_batch_size=64))
    c.split = 1
    c.batch_size = 16
    c.num_epochs = 20
    c.seed = 0
    c.fused_steps = 1
    c.fused_unroll = "auto"
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
    c.recipe = "official"
    c.compilation_cache = ""
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address=placeholder(str), num_processes=placeholder(int),
        process_id=placeholder(int), local_device_ids=placeholder(tuple), auto=False))
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
                          "start from adaparse_jax.train.default_config()")
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

    if config.recipe not in RECIPES:
        fail("recipe", f"one of {tuple(RECIPES)}")
    for f in ("batch_size", "num_epochs", "fused_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval_every_epochs", "data.eval_batch_size"):
        positive_int(f)
    if config.optimizer.schedule not in state_lib.SCHEDULES:
        fail("optimizer.schedule", f"one of {state_lib.SCHEDULES}")
    if not isinstance(config.optimizer.warmup_steps, int) or config.optimizer.warmup_steps < 0:
        fail("optimizer.warmup_steps", "an integer >= 0")
    if not isinstance(config.max_steps, int) or config.max_steps < 0:
        fail("max_steps", "an integer >= 0 (0: no limit)")
    if config.class_weights not in CLASS_WEIGHTS:
        fail("class_weights", f"one of {CLASS_WEIGHTS}")
    if config.selection_mode not in SELECTION_MODES:
        fail("selection_mode", f"one of {SELECTION_MODES}")
    _check_selection(config)
    if config.fused_unroll not in FUSED_UNROLL:
        fail("fused_unroll", f"one of {FUSED_UNROLL}")
    if config.data.loader not in pipeline.MODES:
        fail("data.loader", f"one of {pipeline.MODES}")
    if config.data.generate not in GENERATE:
        fail("data.generate", f"one of {GENERATE}")
    if not isinstance(config.data.num_val, int) or config.data.num_val < 0:
        fail("data.num_val", "an integer >= 0")
    if not isinstance(config.devices, int) or isinstance(config.devices, bool) or config.devices < 0:
        fail("devices", "an integer >= 0 (0: every device)")
    distributed_settings(config)
    data_mesh(config)  # enough devices, and batch_size splits over them
    try:
        models.build_model(config.model)  # the model's own field checks
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from e
    try:
        losses_lib._check_config(config.loss)
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from e


def selection_metrics() -> list[str]:
    """The names `selection_metric` may take: 'score' and every per-image metric of `metrics.score`."""
    return ["score", *metrics_lib.metric_names()]


def _check_selection(config: ml_collections.ConfigDict) -> None:
    names = selection_metrics()
    metric = config.selection_metric
    if metric not in names:
        close = difflib.get_close_matches(metric, names, n=1)
        raise ConfigError(f"config field selection_metric={metric!r} is not a validation metric"
                          + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (valid: {', '.join(names)})")
    if metric.startswith("l1/") and config.selection_mode == "max":
        raise ConfigError(f"config field selection_mode='max' would select the checkpoint with the largest "
                          f"error {metric!r}; set selection_mode='min'")


def fused_unroll(config: ml_collections.ConfigDict) -> bool:
    """`lax.scan`'s unroll for config.fused_steps: True (one straight-line program) or False."""
    if config.fused_unroll == "auto":
        return jax.default_backend() == "cpu"
    return config.fused_unroll == "unrolled"


def data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The data-parallel mesh of `config.devices` (0: every device of the default backend).

    Raises ConfigError when there are fewer devices, or batch_size does not split over them.
    """
    available = jax.devices()
    n = config.devices or len(available)
    if jax.process_count() > 1 and n != len(available):
        raise ConfigError(f"config field devices={config.devices!r}; with {jax.process_count()} "
                          f"processes the mesh spans all {len(available)} devices of all of them: "
                          "use 0")
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


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def distributed_settings(config: ml_collections.ConfigDict) -> dict | None:
    """What `jax.distributed.initialize` gets from config.distributed and $ADAPARSE_DISTRIBUTED:
    None (one process, the default), {} (auto: every setting from the launcher's environment) or
    the fields that are set. Raises ConfigError naming the field of a bad value."""
    d = config.get("distributed") or {}
    env = os.environ.get(DISTRIBUTED_ENV, "")
    if env not in ("", "auto"):
        raise ConfigError(f"environment variable {DISTRIBUTED_ENV}={env!r}; expected 'auto' (JAX finds "
                          "the coordinator and this process's id in the launcher's environment) or unset")

    def fail(field, expected):
        raise ConfigError(f"config field distributed.{field}={d.get(field)!r}; expected {expected}")

    auto = d.get("auto", False)
    if not isinstance(auto, bool):
        fail("auto", "True or False")
    address = d.get("coordinator_address")
    if address is not None:
        host, _, port = str(address).rpartition(":") if isinstance(address, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail("coordinator_address", "'host:port' (process 0's host and a free port), or None")
    num, pid = d.get("num_processes"), d.get("process_id")
    if num is not None and not _is_int(num, 1):
        fail("num_processes", "a positive integer, or None (from the environment)")
    if pid is not None and not _is_int(pid, 0):
        fail("process_id", "an integer >= 0, or None (from the environment)")
    if num is not None and pid is not None and pid >= num:
        fail("process_id", f"an integer below distributed.num_processes={num}")
    ids = d.get("local_device_ids")
    if ids is not None:
        ids = [ids] if _is_int(ids, 0) else ids
        if (not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i, 0) for i in ids)
                or len(set(ids)) != len(ids)):
            fail("local_device_ids", "distinct device ids >= 0 of this host, e.g. (0, 1), or None (all)")
        ids = list(ids)
    explicit = {k: v for k, v in zip(DISTRIBUTED_FIELDS, (address, num, pid, ids)) if v is not None}
    if auto or env == "auto":
        if explicit:
            which = "distributed.auto=True" if auto else f"{DISTRIBUTED_ENV}=auto"
            raise ConfigError(f"{which} takes every setting from the launcher's environment; leave "
                              + ", ".join(f"distributed.{k}" for k in explicit) + " unset (None)")
        return {}
    if explicit and address is None:
        raise ConfigError(f"config field distributed.{next(iter(explicit))} is set but "
                          "distributed.coordinator_address is not: give process 0's 'host:port', or "
                          "set distributed.auto=True")
    return explicit or None


def init_distributed(config: ml_collections.ConfigDict) -> bool:
    """Start JAX's multi-process runtime when the config or the environment asks for it (see
    `distributed_settings`); before anything touches a device. True when it runs (now or before)."""
    settings = distributed_settings(config)
    if settings is None:
        return False
    try:
        parallel.initialize(**settings)
    except RuntimeError as e:
        raise ConfigError(f"config.distributed: jax.distributed.initialize({settings}) failed: {e}") from e
    return True


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with command-line overrides such as '--config.model.parser_pool=flatten'
    applied as `train.py` applies them (ml_collections' config_flags: each value parsed as the field's
    type, e.g. '1' for a float field is 1.0). `config` itself is left as it is.

    Raises ConfigError naming the override: an unknown field (with the valid ones), a value that is
    not of the field's type, or an argument that is not '--config.FIELD=VALUE'.
    """
    from absl import flags
    from ml_collections import config_flags

    for arg in overrides:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ConfigError(f"override {arg!r}: expected --config.FIELD=VALUE")
    check_overrides(config, overrides)
    argv = ["apply_overrides", *overrides]
    fv = flags.FlagValues()
    # sys_argv: config_flags otherwise finds the override flags in this process's sys.argv.
    config_flags.DEFINE_config_dict("config", copy.deepcopy(config), flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from e
    return fv.config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file as `train.py --config PATH[:ARG] --config.x=y ...` does.

    Args:
      path: a config file with `get_config(arg=None)`, optionally followed by ':ARG'.
      overrides: command-line overrides such as '--config.split=2' (`apply_overrides`).
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["load_config", f"--config={path}"]
    fv = flags.FlagValues()
    # sys_argv: config_flags otherwise finds the override flags in this process's sys.argv.
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from e
    return apply_overrides(fv.config, overrides) if overrides else fv.config


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
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if "distributed" not in config:  # saved before the field existed: one process
        config.distributed = default_config().distributed
    for field, value in ADDED_FIELDS.items():
        group, leaf = field.split(".")
        if group in config and leaf not in config[group]:
            config[group][leaf] = value
    return config


def check_and_save_config(config: ml_collections.ConfigDict, workdir: Path, *, write: bool = True) -> None:
    """Save the config; refuse a workdir whose run used another config (model or otherwise).
    `write=False` only checks (the processes other than 0 of a multi-process run)."""
    path = workdir / CONFIG_JSON
    new = _normalise(config)
    if path.is_file() and (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        old = _normalise(json.loads(path.read_text()))
        fo, fn = {**ADDED_FIELDS, **_flat(old)}, _flat(new)
        # A decaying learning rate is a function of the run's length: its epochs are then fixed.
        resumable = set(RESUMABLE_FIELDS) - ({"num_epochs"} if fn.get("optimizer.schedule") != "constant"
                                             else set())
        diff = [k for k in sorted(set(fo) | set(fn)) if fo.get(k) != fn.get(k) and k not in resumable]
        if diff:
            lines = [f"{k}: saved {fo.get(k, '(absent)')!r}, now {fn.get(k, '(absent)')!r}" for k in diff]
            what = ("its checkpoints are from a different model" if any(k.startswith("model.") for k in diff)
                    else "it holds a run with another config")
            raise ConfigError(
                f"workdir {workdir} cannot continue with this config: {what}:\n  " + "\n  ".join(lines)
                + "\nuse another --workdir (fields that may change on resume: "
                + ", ".join(f for f in RESUMABLE_FIELDS if f in resumable) + ")")
    if write:
        atomic.write_json(path, new, sort_keys=True)


def run_label(config: ml_collections.ConfigDict) -> str:
    """The row label of a run in the report tables: config.label, or the method's name."""
    if config.get("label"):
        return str(config.label)
    name = {"adaparse": "AdaParse", "renet": "RE-Net"}[config.model.arch]
    recipe = config.get("recipe", "official")
    if recipe != "official":
        name = f"{name} ({recipe})"
    return f"Random G.T. ({name})" if config.random_gt else name


