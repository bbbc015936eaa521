"""The training loop: `train(config, workdir)` trains (or resumes) one run. `train.py` chains it with
the evaluation of the selected checkpoint (`evaluation.evaluate_run`).

1. checks the config (`config.default_config` lists every field), saves it as
   `<workdir>/config.json`, and refuses a workdir whose saved run used another config;
2. loads the dataset and split, decodes it into the cache if needed, builds the training labels
   (optionally the Random G.T. permutation) and the class weights (`data.setup_data`);
3. restores the latest checkpoint if there is one (model identity checked), else initialises;
4. replicates the state over the data-parallel mesh (`config.devices`) and compiles the step once
   per call length, logging parameter count, devices, compiled memory, FLOPs and compile seconds
   (also a 'compile/train_step_s' record in metrics.jsonl and the summary's 'compile_s');
5. trains with a progress bar; metrics of log steps are fetched one call late and written to
   `<workdir>/metrics.jsonl` (and TensorBoard when installed); every fetched loss is checked and a
   non-finite one stops the run (`NonFiniteLossError`) before anything is saved;
6. checkpoints every `checkpoint_every_steps` and at each epoch end (state, data position, meta);
   with validation generators, scores the checkpoint on them and keeps the best.

Several processes (config.distributed, README "Several hosts"): `train` starts JAX's multi-process
runtime first; every process runs this same loop on the replicated state, reads only its rows of
each global batch, computes the validation itself (on its own copy of the state) and writes and
restores the checkpoints with the others (Orbax); process 0 alone generates and decodes the data
(the others wait for it) and writes config.json, metrics.jsonl, selection.json and train.log.

`hooks`: callables `hook(previous_step, step)` run after each dispatched call (tests use one to
kill the process at a chosen step, as a preemption would). Rerunning in the same workdir resumes
from the last checkpoint; on a CPU the losses after a resume are bit-identical.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaparse_jax import checkpointing, models, parallel
from adaparse_jax import metrics as metrics_lib
from adaparse_jax.data import pipeline
from adaparse_jax.train import config as config_lib
from adaparse_jax.train import state as state_lib
from adaparse_jax.train.data import RunData, resolve_paths, setup_data
from adaparse_jax.train.writer import MetricsWriter

log = logging.getLogger("adaparse_jax.train")
Hook = Callable[[int, int], None]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stopped without saving that state."""


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


def _describe(stats: dict) -> str:
    memory = ", ".join(f"{f.replace('_size_in_bytes', '')} {v / 2**20:.1f} MiB" for f, v in stats.items()
                       if f.endswith("bytes")) or "not reported"
    flops = f"; {stats['flops'] / 1e9:.1f} GFLOP per call" if "flops" in stats else ""
    return f"memory: {memory}{flops}"


def _unstack(step_end: int, k: int, metrics: dict) -> list[tuple[int, dict]]:
    """Host metrics of one call -> [(step, {name: float})] for each of its k optimiser steps."""
    if k == 1 and all(np.ndim(v) == 0 for v in metrics.values()):
        return [(step_end, {n: float(v) for n, v in metrics.items()})]
    return [(step_end - k + 1 + i, {n: float(np.asarray(v)[i]) for n, v in metrics.items()})
            for i in range(k)]


def _first_nonfinite(records: Sequence[tuple[int, dict]]) -> tuple[int, list[str], dict] | None:
    for step, m in records:
        bad = [k for k, v in m.items() if k.startswith("train/loss/") and not math.isfinite(v)]
        if bad:
            return step, bad, m
    return None


def validate(config, run: RunData, eval_step, variables, loader) -> dict:
    """Per-image metrics of the validation generators (true labels, also under Random G.T.) and
    'score' (`state.selection_score`)."""
    loader.reset()
    if jax.process_count() > 1:  # the pass runs on this process's copy, not split over the mesh
        variables = parallel.local_copy(variables)
    preds = state_lib.predict_batches(eval_step, variables, loader, config.data.eval_batch_size)
    scores = metrics_lib.score(preds, run.dataset.labels[preds["generator"]])
    scores["score"] = state_lib.selection_score(scores)
    return scores


class Trainer:
    """One run's training: built by `train`, which owns the log file; `run()` trains to the end."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, hooks: Sequence[Hook] = ()):
        self.config, self.workdir, self.hooks = config, workdir, list(hooks)
        self.train_loader = self.val_loader = self.writer = self.ckpt = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config, workdir = self.config, self.workdir
        self.primary = parallel.is_primary()
        # Process 0 generates and decodes the data; the others read it once it is there.
        if not self.primary:
            parallel.sync("adaparse_jax: data ready")
        self.data = setup_data(config, progress=config.progress and self.primary,
                               prepare=None if self.primary else False)
        if self.primary:
            parallel.sync("adaparse_jax: data ready")
        split = self.data.split
        log.info("run %s: %s split %s: %d train, %d validation, %d test generators%s", workdir,
                 self.data.dataset.name, config.split, len(split.train), len(split.val), len(split.test),
                 " (Random G.T. labels)" if config.random_gt else "")
        self.model = models.build_model(config.model)
        self.mesh = config_lib.data_mesh(config)
        self._open_loaders()
        self.steps_per_epoch = len(self.train_loader)
        self.total = self.steps_per_epoch * config.num_epochs
        self.tx = state_lib.make_optimizer(config, total_steps=self.total)
        self.stop = min(self.total, config.max_steps) if config.max_steps else self.total
        self.ckpt = checkpointing.Checkpointer(workdir / checkpointing.CHECKPOINTS,
                                               keep=config.keep_checkpoints, best_mode=config.selection_mode)
        self.writer = MetricsWriter(workdir, config.tensorboard, enabled=self.primary)
        self.state = self._restore_or_init()
        self.start = int(self.state.step)
        self.n_params = state_lib.param_count(self.state.params)
        log.info("model %s: %s parameters (%s)", config.model.arch, f"{self.n_params:,}",
                 ", ".join(f"{k} {state_lib.param_count(v):,}" for k, v in self.state.params.items()))
        log.info("data parallel over %d %s device(s) of %d process(es): batch %d, %d per device; state "
                 "replicated (compiled memory and FLOPs below: per device)", self.mesh.size,
                 jax.default_backend(), jax.process_count(), config.batch_size,
                 config.batch_size // self.mesh.size)
        # The step's data arguments: one executable serves every run of this model and shape.
        self.tables = parallel.replicate(
            (jnp.asarray(self.data.train_labels, jnp.float32),
             {k: jnp.asarray(v, jnp.float32) for k, v in self.data.class_weights.items()}), self.mesh)
        # Evaluation is not split over the mesh: jit runs the replicated state on unsplit batches as
        # they are, so any eval_batch_size and a short last batch work; it is a small share of a run.
        self.eval_step = state_lib.make_eval_step(self.model)
        self.selection = checkpointing.read_selection(workdir) or {
            "metric": config.selection_metric, "mode": config.selection_mode, "history": []}
        # Entries after the restored step belong to a crashed continuation: they are redone.
        self.selection["history"] = [h for h in self.selection["history"] if h["step"] <= self.start]
        self.compiled: dict[int, Callable] = {}
        self.compile_s = 0.0
        self.pending: list[tuple[int, int, dict]] = []  # (last step of the call, k, device metrics)
        self.log_steps: set[int] = set()
        self.timer = {"t": time.perf_counter(), "step": self.start}

    def _open_loaders(self) -> None:
        c, d = self.config, self.data
        if jax.process_count() > 1 and c.data.loader != "grain":
            raise config_lib.ConfigError(
                f"config field data.loader={c.data.loader!r}; with {jax.process_count()} processes use "
                "'grain' (each process reads its own rows of every batch; the device-resident loader "
                "keeps every record on every device and runs in one process)")
        # Training batches reach the step split over the mesh: grain puts each host batch there
        # directly; the device loader keeps its records on every device (each batch is gathered
        # from all of them), and `shard_batch` splits what it gathers.
        self.train_loader = pipeline.Loader(
            d.cache, d.split.train, batch_size=c.batch_size, seed=c.seed, train=True,
            num_epochs=c.num_epochs, mode=c.data.loader, num_workers=c.data.workers,
            prefetch=c.data.prefetch, names=d.dataset.names,
            sharding=parallel.batch_sharding(self.mesh) if c.data.loader == "grain"
            else parallel.replicated(self.mesh))
        if d.split.val:
            self.val_loader = pipeline.Loader(d.cache, d.split.val, batch_size=c.data.eval_batch_size,
                                              train=False, mode=c.data.loader,
                                              num_workers=c.data.workers, names=d.dataset.names)

    def _restore_or_init(self):
        size = self.config.model.image_size
        if self.ckpt.latest_step() is None:
            return parallel.replicate(state_lib.init_state(self.model, self.tx, jax.random.key(self.config.seed),
                                                           (size, size, 3)), self.mesh)
        abstract = state_lib.state_shapes(self.model, self.tx, (size, size, 3))
        state, loader_state, meta = self.ckpt.restore(abstract, model_config=self.config.model.to_dict(),
                                                      sharding=parallel.replicated(self.mesh))
        self.train_loader.set_state(loader_state)
        self.writer.truncate(int(state.step))
        log.info("resumed from checkpoint step %d (epoch %d)", int(state.step), meta.get("epoch", -1))
        return state

    # -- compiling ---------------------------------------------------------------------------------

    def lower(self, k: int):
        """The train step of k optimiser steps per call, lowered for this run's shapes and mesh."""
        c = self.config
        fn = state_lib.make_train_step(self.model, self.tx, loss_config=c.loss, fused_steps=k,
                                       unroll=config_lib.fused_unroll(c) if k > 1 else 1)
        sharding = parallel.batch_sharding(self.mesh, fused_steps=k)
        size, B = c.model.image_size, c.batch_size
        lead = (B,) if k == 1 else (k, B)
        spec = {"image": jax.ShapeDtypeStruct((*lead, size, size, 3), jnp.uint8, sharding=sharding),
                "generator": jax.ShapeDtypeStruct(lead, jnp.int32, sharding=sharding)}
        return fn.lower(self.state, spec, *self.tables)

    def step_fn(self, k: int) -> Callable:
        """The compiled step of k optimiser steps per call (compiled on first use, timed)."""
        if k not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[k] = self.lower(k).compile()
            seconds = time.perf_counter() - t0
            self.compile_s += seconds
            log.info("train step (%d optimiser step%s per call) compiled in %.1f s; %s", k,
                     "s" if k > 1 else "", seconds, _describe(compiled_stats(self.compiled[k])))
        return self.compiled[k]

    def _call_sizes(self) -> list[int]:
        """Call lengths the loop will use: K, and 1 where an epoch (or max_steps) leaves a remainder."""
        sizes, s, K = set(), self.start, self.config.fused_steps
        while s < self.stop:
            k = min(K, (s // self.steps_per_epoch + 1) * self.steps_per_epoch - s, self.stop - s)
            sizes.add(k if k == K else 1)
            s += k
        return sorted(sizes)

    # -- metrics -----------------------------------------------------------------------------------

    def flush(self, upto: int) -> None:
        """Fetch the metrics of calls ending at or before `upto`; check them; log the log steps."""
        ready = [p for p in self.pending if p[0] <= upto]
        if not ready:
            return
        self.pending = [p for p in self.pending if p[0] > upto]
        records = [r for end, k, m in ready for r in _unstack(end, k, jax.device_get(m))]
        bad = _first_nonfinite(records)
        if bad is not None:
            self._nonfinite(*bad)
        now = time.perf_counter()
        for step, m in records:
            if step not in self.log_steps:
                continue
            self.log_steps.discard(step)
            rate = self.config.batch_size * (step - self.timer["step"]) / max(now - self.timer["t"], 1e-9)
            self.timer.update(t=now, step=step)
            self.writer.write({"step": step, "epoch": (step - 1) // self.steps_per_epoch, **m,
                               "train/img_per_s": rate})
            self.bar.set_postfix(loss=f"{m['train/loss/total']:.4g}", img_s=f"{rate:.0f}")

    def _nonfinite(self, step: int, names: list[str], m: dict) -> None:
        last = self.ckpt.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (epoch {(step - 1) // self.steps_per_epoch}): "
            + ", ".join(f"{n.removeprefix('train/loss/')}={m[n]}" for n in names)
            + (f"; the last good checkpoint is step {last} in {self.ckpt.directory} (the bad state was "
               "not saved)" if last is not None else "; no checkpoint was saved yet")
            + ". Lower optimizer.learning_rate or check the data, then rerun (it resumes "
            "from that checkpoint)")

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, *, val: dict | None = None) -> None:
        step, c = int(self.state.step), self.config
        metrics = None
        if val is not None:
            value = float(val[c.selection_metric])
            metrics = {checkpointing.SELECTION_KEY: value}
            self.selection["history"].append({"step": step, "value": value})
            self.selection["best_step"], self.selection["best_value"] = checkpointing.best_of(
                self.selection["history"], c.selection_mode)
            # Written before the checkpoint: a crash in between leaves an entry whose step has
            # no checkpoint, which `selected_step` skips and a resume drops.
            if self.primary:
                checkpointing.write_selection(self.workdir, self.selection)
        self.ckpt.save(self.state, loader_state=self.train_loader.get_state(),
                       meta={"model": c.model.to_dict(), "epoch": step // self.steps_per_epoch,
                             "param_count": self.n_params, "label": config_lib.run_label(c)},
                       metrics=metrics)

    def checkpoint(self, prev: int, step: int) -> None:
        """Save when the step crosses checkpoint_every_steps, an epoch end or the stop (validated at
        epoch ends when there are validation generators)."""
        c = self.config
        at_epoch_end = step % self.steps_per_epoch == 0
        if not (step // c.checkpoint_every_steps > prev // c.checkpoint_every_steps
                or at_epoch_end or step == self.stop):
            return
        self.flush(step)  # every loss up to here is checked before the state is saved
        val = None
        epoch = step // self.steps_per_epoch
        if self.val_loader is not None and at_epoch_end and epoch % c.eval_every_epochs == 0:
            val = validate(c, self.data, self.eval_step, state_lib.variables_of(self.state),
                           self.val_loader)
            self.writer.write({"step": step, "epoch": epoch - 1, **{f"val/{k}": v for k, v in val.items()}})
            log.info("epoch %d validation: %s = %.4f", epoch, c.selection_metric, val[c.selection_metric])
        self.save(val=val)
        self.timer.update(t=time.perf_counter(), step=step)  # img/s measures training only

    # -- the loop ----------------------------------------------------------------------------------

    def dispatch(self, step: int) -> int:
        """Run the next call from `step` (K fused steps, or an epoch's remainder as single steps)."""
        K = self.config.fused_steps
        k = min(K, (step // self.steps_per_epoch + 1) * self.steps_per_epoch - step, self.stop - step)
        batches = [next(self.train_loader) for _ in range(k)]
        if k == K:
            batch = batches[0] if k == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
            self.state, m = self.step_fn(k)(self.state, parallel.shard_batch(batch, self.mesh, fused_steps=k),
                                            *self.tables)
            self.pending.append((step + k, k, m))
        else:
            for i, b in enumerate(batches):
                self.state, m = self.step_fn(1)(self.state, parallel.shard_batch(b, self.mesh), *self.tables)
                self.pending.append((step + i + 1, 1, m))
        return step + k

    def run(self) -> dict:
        from tqdm.auto import tqdm

        for k in self._call_sizes():  # compile before the loop
            self.step_fn(k)
        if self.compiled:
            self.writer.write({"step": self.start, "compile/train_step_s": self.compile_s})
        self.timer.update(t=time.perf_counter())
        self.bar = tqdm(total=self.stop, initial=self.start, unit="step",
                        disable=not (self.config.progress and self.primary),
                        dynamic_ncols=True, desc="train")
        step, flush_upto = self.start, None
        while step < self.stop:
            prev, step = step, self.dispatch(step)
            self.bar.update(step - prev)
            for hook in self.hooks:
                hook(prev, step)
            if flush_upto is not None:  # the previous log call's metrics: ready or nearly
                self.flush(flush_upto)
                flush_upto = None
            logged = [s for s in range(prev + 1, step + 1)
                      if s % self.config.log_every_steps == 0 or s == self.stop]
            if logged:
                self.log_steps.update(logged)
                flush_upto = step
            self.checkpoint(prev, step)
        self.flush(self.stop)
        self.bar.close()
        self.ckpt.wait()
        return self.summary()

    def summary(self) -> dict:
        step = int(self.state.step)
        finished = step >= self.total
        if not finished:
            log.info("stopped at step %d of %d (max_steps); rerun to continue", step, self.total)
        return {"workdir": str(self.workdir), "step": step, "finished": finished,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
                "label": config_lib.run_label(self.config), "compile_s": self.compile_s}

    def close(self) -> None:
        for resource in (self.train_loader, self.val_loader, self.writer, self.ckpt):
            if resource is not None:
                resource.close()


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          hooks: Sequence[Hook] = ()) -> dict:
    """Train (or resume) the run in `workdir` (see the module docstring).

    Returns a summary: workdir, final step, whether training finished, steps per epoch, total
    steps, the run label and the seconds spent compiling the train step in this call.
    """
    config_lib.init_distributed(config)  # before anything touches a device
    config_lib.validate_config(config)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = resolve_paths(config, workdir)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(config.compilation_cache).expanduser()))
    primary = parallel.is_primary()
    handler = logging.FileHandler(workdir / "train.log") if primary else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    trainer = None
    try:
        config_lib.check_and_save_config(config, workdir, write=primary)
        trainer = Trainer(config, workdir, hooks)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        log.removeHandler(handler)
        handler.close()
