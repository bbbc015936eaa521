"""Training: config schema and validation (`config`), state, optimiser and pure steps (`state`), the
data of a run (`data`), metrics writing (`writer`) and the loop (`loop`).

    from adaparse_jax import train as training
    config = training.load_config("configs/tiny.py", ["--config.num_epochs=1"])
    summary = training.train(config, "runs/tiny")      # train.py also evaluates afterwards

The names below are the package's public API, re-exported from its modules.
"""

from adaparse_jax.train.config import (
    ADDED_FIELDS,
    CONFIG_JSON,
    DISTRIBUTED_ENV,
    GENERATE,
    ConfigError,
    apply_overrides,
    check_and_save_config,
    check_overrides,
    data_mesh,
    default_config,
    distributed_settings,
    fused_unroll,
    init_distributed,
    load_config,
    load_saved_config,
    run_label,
    validate_config,
)
from adaparse_jax.train.data import RunData, random_gt_labels, resolve_paths, setup_data
from adaparse_jax.train.loop import NonFiniteLossError, Trainer, compiled_stats, train
from adaparse_jax.train.recipes import RECIPES, apply_recipe
from adaparse_jax.train.state import (
    TrainState,
    apply_model,
    check_images,
    decisions,
    init_state,
    learning_rate,
    make_eval_step,
    make_optimizer,
    make_train_step,
    param_count,
    predict_batches,
    selection_score,
    state_shapes,
    training_loss,
    variables_of,
)
from adaparse_jax.train.writer import METRICS_JSONL, MetricsWriter, read_metrics

__all__ = [
    "ADDED_FIELDS", "CONFIG_JSON", "DISTRIBUTED_ENV", "GENERATE", "METRICS_JSONL", "RECIPES", "ConfigError",
    "MetricsWriter",
    "NonFiniteLossError", "RunData", "TrainState", "Trainer", "apply_model", "apply_recipe",
    "apply_overrides", "check_and_save_config", "check_images", "check_overrides",
    "compiled_stats", "data_mesh", "decisions", "default_config", "distributed_settings",
    "fused_unroll", "init_distributed", "init_state",
    "learning_rate", "load_config", "load_saved_config", "make_eval_step", "make_optimizer",
    "make_train_step", "param_count", "predict_batches", "random_gt_labels", "read_metrics",
    "resolve_paths", "run_label", "selection_score", "setup_data", "state_shapes", "train",
    "training_loss", "validate_config", "variables_of",
]
