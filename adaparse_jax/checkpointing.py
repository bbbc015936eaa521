"""Orbax checkpoints of a training run: full state, data-iterator position, and model identity.

One checkpoint (directory `<workdir>/checkpoints/<step>/`) holds three items:

  state   params, batch statistics, optimiser state, step and the PRNG key (as raw key data)
  loader  the training Loader's position {"epoch", "step", ...} (JSON), so a resumed run reads
          exactly the batches an uninterrupted one would
  meta    the model config, epoch, parameter count and save time (JSON)

Saving is atomic (Orbax writes a temporary directory and renames it when complete), so a run killed
mid-save leaves the previous checkpoint intact and the partial one is ignored and cleaned up. The
manager keeps the last `keep` checkpoints and, when validation scores are given, also the best one
(`best_mode` 'max' or 'min').

Saves are synchronous by default: the train step donates its state buffers, and on the CPU backend
an asynchronous save could still be reading a buffer that the next step reuses.

Restoring checks model identity before reading any array: a checkpoint written by another model
config raises `CheckpointMismatchError` naming the differing fields, and (for checkpoints without
that record) differing parameter shapes are listed by path. Arrays are restored where the caller
says (`restore(sharding=...)`: the first device, or replicated over a data-parallel mesh), not where
they were saved, so a checkpoint written on 8 devices resumes or evaluates on 1 and vice versa.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from adaparse_jax import atomic

CHECKPOINTS = "checkpoints"
SELECTION = "selection.json"
SELECTION_KEY = "selection"  # the metric name under which a checkpoint's validation score is saved


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to the model being built."""


def _state_tree(state) -> dict:
    """TrainState -> a plain dict Orbax can store (typed PRNG keys as their uint32 key data)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


def _abstract_tree(abstract_state) -> dict:
    rng = abstract_state.rng
    key_data = jax.eval_shape(jax.random.key_data, rng) if jax.dtypes.issubdtype(
        rng.dtype, jax.dtypes.prng_key) else rng
    return {"step": abstract_state.step, "params": abstract_state.params,
            "batch_stats": abstract_state.batch_stats, "opt_state": abstract_state.opt_state,
            "rng": key_data}


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _model_diff(saved: Mapping, wanted: Mapping) -> list[str]:
    """'field: checkpoint X, config Y' for every model field that differs (JSON-normalised)."""
    saved = json.loads(json.dumps(dict(saved)))
    wanted = json.loads(json.dumps(dict(wanted)))
    keys = sorted(set(saved) | set(wanted))
    return [f"model.{k}: checkpoint {saved.get(k, '(absent)')!r}, config {wanted.get(k, '(absent)')!r}"
            for k in keys if saved.get(k) != wanted.get(k)]


class Checkpointer:
    """Save and restore the checkpoints of one training run.

    Args:
      directory: where the step directories go (created).
      keep: how many of the latest checkpoints to keep.
      best_mode: 'max' or 'min': how validation scores passed to `save(metrics=...)` rank; the best
        checkpoint is kept in addition to the last `keep`.
      save_async: let Orbax write in the background (only safe when the caller does not donate the
        saved buffers to a later computation).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, best_mode: str = "max",
                 save_async: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).resolve()
        self.best_mode = best_mode
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            # BestN keeps the last n after an ascending sort: the largest for reverse=False.
            pp.BestN(get_metric_fn=lambda m: m[SELECTION_KEY], reverse=best_mode == "min", n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=save_async,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "loader": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    # -- queries ---------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def meta(self, step: int) -> dict:
        """The JSON meta record of a checkpoint."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    # -- save / restore --------------------------------------------------------------------------

    def save(self, state, *, loader_state: Mapping, meta: Mapping,
             metrics: Mapping[str, float] | None = None) -> None:
        """Save `state` (a TrainState) at its step; `metrics` = {'selection': score} ranks it."""
        step = int(jax.device_get(state.step))
        meta = {**meta, "step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                loader=ocp.args.JsonSave(dict(loader_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=dict(metrics) if metrics is not None else None,
            force=True,
        )

    def check_compatible(self, step: int, abstract_state, model_config: Mapping | None) -> None:
        """Raise CheckpointMismatchError if checkpoint `step` was written for another model.

        `abstract_state`: a TrainState of ShapeDtypeStructs (every array is compared) or a
        variables dict {'params', 'batch_stats'} (only those are compared).
        """
        where = f"checkpoint step {step} in {self.directory}"
        if model_config is not None:
            saved = self.meta(step).get("model")
            if saved is not None:
                diff = _model_diff(saved, model_config)
                if diff:
                    raise CheckpointMismatchError(
                        f"{where} was written by a different model:\n  " + "\n  ".join(diff)
                        + "\nuse another --workdir, or the model config the checkpoint was trained with")
        metadata = self._manager.item_metadata(step)["state"]
        saved_shapes = {_path_str(p): tuple(m.shape) for p, m in
                        jax.tree_util.tree_flatten_with_path(
                            metadata, is_leaf=lambda x: hasattr(x, "shape"))[0] if hasattr(m, "shape")}
        tree = abstract_state if isinstance(abstract_state, Mapping) else _abstract_tree(abstract_state)
        wanted = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        if isinstance(abstract_state, Mapping):  # variables only: the other saved arrays do not count
            saved_shapes = {p: s for p, s in saved_shapes.items() if p.split("/")[0] in tree}
        problems = []
        order = ("params/", "batch_stats/", "step", "rng", "opt_state/")  # the telling ones first
        for path in sorted(set(saved_shapes) | set(wanted),
                           key=lambda p: (next(i for i, o in enumerate(order + ("",)) if p.startswith(o)), p)):
            a, b = saved_shapes.get(path), wanted.get(path)
            if a != b:
                problems.append(f"{path}: checkpoint {a if a is not None else '(absent)'}, "
                                f"model {b if b is not None else '(absent)'}")
        if problems:
            shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
            raise CheckpointMismatchError(
                f"{where} does not fit this model ({len(problems)} parameter or state arrays "
                "differ):\n  " + "\n  ".join(shown)
                + "\nuse another --workdir, or the model config the checkpoint was trained with")

    def _check_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; steps: {self.steps()}")
        return step

    def restore_variables(self, abstract_variables: Mapping, step: int | None = None, *,
                          model_config: Mapping | None = None,
                          sharding: jax.sharding.Sharding | None = None) -> dict:
        """{'params', 'batch_stats'} of checkpoint `step` (default: the latest), nothing else read.

        An Orbax partial restore: the optimiser state, step and PRNG key stay on disk, so a run
        restores for inference whatever optimiser it was trained with.
        """
        step = self._check_step(step)
        wanted = {k: abstract_variables[k] for k in ("params", "batch_stats")}
        self.check_compatible(step, wanted, model_config)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), wanted)
        # The manager's handler for 'state' restores whole trees only; the PyTree handler reads the
        # same files and supports a partial target.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            out = reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return {k: out[k] for k in wanted}

    def restore(self, abstract_state, step: int | None = None, *,
                model_config: Mapping | None = None,
                sharding: jax.sharding.Sharding | None = None) -> tuple[Any, dict, dict]:
        """(TrainState, loader state, meta) of checkpoint `step` (default: the latest).

        Args:
          abstract_state: TrainState of ShapeDtypeStructs (`training.state_shapes`): the structure
            and shapes to restore into.
          model_config: the model config being built; compared with the one the checkpoint records.
          sharding: where every array goes, e.g. `parallel.replicated(mesh)` for a data-parallel
            run; default: the first device. (Never the devices the checkpoint was saved from, which
            Orbax would otherwise use: a run saved on 8 devices could not be read on 1.)
        """
        step = self._check_step(step)
        self.check_compatible(step, abstract_state, model_config)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              _abstract_tree(abstract_state))
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                loader=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        tree = out["state"]
        rng = tree["rng"]
        if jax.dtypes.issubdtype(abstract_state.rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.wrap_key_data(rng)  # the default implementation, as init_state uses
        state = abstract_state.replace(step=tree["step"], params=tree["params"],
                                       batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
                                       rng=rng)
        return state, dict(out["loader"]), dict(out["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- model selection ----------------------------------------------------------------------------


def write_selection(workdir: str | Path, record: Mapping) -> None:
    """Atomically write `<workdir>/selection.json` (the validation history and the best step)."""
    atomic.write_json(Path(workdir) / SELECTION, dict(record))


def read_selection(workdir: str | Path) -> dict | None:
    path = Path(workdir) / SELECTION
    return json.loads(path.read_text()) if path.is_file() else None


def best_of(history, mode: str, steps=None) -> tuple[int | None, float | None]:
    """(step, value) of the best validation entry; ties go to the later step, as Orbax's BestN
    ranks them (so the checkpoint it keeps is this one). `steps`: only these steps count."""
    best = (None, None)
    for h in sorted(history, key=lambda h: h["step"]):
        if steps is not None and h["step"] not in steps:
            continue
        v = h["value"]
        if best[1] is None or (v >= best[1] if mode == "max" else v <= best[1]):
            best = (int(h["step"]), float(v))
    return best


def selected_step(workdir: str | Path) -> tuple[int, str]:
    """The checkpoint a run's evaluation uses, and why.

    With validation generators the run wrote `selection.json`: the best of its validated
    checkpoints by the validation score (never the test generators). Otherwise the last checkpoint.
    """
    ckpt_dir = Path(workdir) / CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if ckpt_dir.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (has the run in {workdir} trained?)")
    sel = read_selection(workdir)
    if sel is not None and sel.get("history"):
        step, value = best_of(sel["history"], sel["mode"], set(steps))
        if step is not None:
            return step, f"best by validation {sel['metric']} ({sel['mode']}) = {value:.4f}"
    return steps[-1], "last checkpoint (no validation score)"
