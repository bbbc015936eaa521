"""Why a run learns what it learns: gradient balance, Adam's damping, dead units, fingerprint probe.

  python -m adaparse_jax.diagnose --workdir runs/demo/runs/adaparse_fold1            # its checkpoint
  python -m adaparse_jax.diagnose --workdir RUN --step 300 --images 128 --out DIR
  python -m adaparse_jax.diagnose --config configs/tiny.py:zoo --dataset runs/zoo --out runs/diag0 \\
      --config.loss.constraint_scale=0.01              # a fresh initialisation, no training

On a fixed, seeded sample of the run's training images (`--images`, drawn from the training
generators of its split, in batches of the run's batch size), with the run's labels (Random G.T.
runs: their permuted ones), class weights and loss config at the checkpoint's step, it reports:

1. **Loss terms and their gradients.** Every term of `losses.total_loss`, and the norm of its
   gradient (mean over the sample's batches: BatchNorm in training mode, as in a training step) on
   each parameter group (`PARAM_GROUPS`: AdaParse's extractor `fen/shared`, hypernetwork
   `fen/hypernet`, personalised blocks `fen/middle+adaptive` and `parser`; RE-Net's `fen` and
   `parser`), the norm over all parameters, and for the four constraints together and the 19
   cross-entropies together; then their ratio per group.
2. **Adam's effective step ratio** per group, from the checkpoint's optimiser state: per parameter,
   RMS over the sample's batches of the cross-entropies' gradient / (sqrt(v_hat) + eps): about 1
   when the parsing losses make up the gradient Adam normalises by (the parameter moves by about
   the learning rate); far below 1 when something else (the constraints, an early large gradient
   that beta2 still remembers) fills v_hat. Median and 10 / 90 % per group. Not available on a
   fresh initialisation (no second moments yet).
3. **Activations** in the same training-mode pass: for every layer whose output goes through a
   ReLU (`RELU_LAYERS`), the fraction of units (channels) never active on the sample and the
   fraction always active; for those and the parser's heads, the image-dependent spread: RMS over
   elements of the std across images / RMS of the mean across images (post-ReLU), and the std
   itself (for a head: how much its logits vary from image to image).
4. **A probe**: a logistic regression on `zoo.probe.spectral_features`, grouped k-fold by generator
   over the sample (`zoo.probe.held_out_decisions`, one image per unit), per discrete attribute the
   held-out macro F1 from the raw images and from the fingerprint the attribute's head reads
   (AdaParse: the target's own; RE-Net: the one), against the true labels.

Writes DIR/diagnose.md and DIR/diagnose.json (default DIR: <workdir>/diagnose, or
<workdir>/diagnose_step<N> with --step) and prints the Markdown. The checkpoint defaults to the
run's selected one (`checkpointing.selected_step`, as `runs.load` uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adaparse_jax import losses, targets
from adaparse_jax.data import pipeline
from adaparse_jax.zoo import probe as probe_lib

# A parameter belongs to the group of the first prefix here that its path starts with, else to its
# top-level name (RE-Net: 'fen', 'parser'; AdaParse: 'parser').
PARAM_GROUPS = (
    ("fen/shared/", "fen/shared"),  # stem + blocks before the hypernetwork: the extractor trunk
    ("fen/hypernet/", "fen/hypernet"),
    ("fen/middle/", "fen/middle+adaptive"),  # the personalised blocks
    ("fen/adaptive/", "fen/middle+adaptive"),
)
# Module paths whose output feeds a ReLU: the captured output is the pre-activation (convolution,
# dense, BatchNorm) or, for a DnCNN block, the post-ReLU output; both are > 0 exactly where the
# unit is active. The tests check the table against the models' layer counts.
RELU_LAYERS = re.compile(r"(^|/)(stem|block\d+|stage\d+_bn|instance_encoder/bn\d+|fusion/bn"
                         r"|parser/conv\d+|parser/fc\d+)$")
HEAD_LAYERS = re.compile(r"^parser/head_\w+$")
CONSTRAINTS = "constraints (4)"
CROSS_ENTROPIES = f"cross-entropies ({len(targets.CLASSIFICATION_TARGETS)})"
TOTAL = "total"
ALL = "all"  # the norm over every parameter, computed on its own (not from the groups)
PROBE_FOLDS = 5
MARKDOWN = "diagnose.md"
JSON = "diagnose.json"


class DiagnoseError(ValueError):
    """A run, checkpoint or option that cannot be diagnosed (one line: what and where)."""


# ------------------------------------------------------------------------------------------------
# Access to a run: the only code that reads adaparse_jax.train and checkpoints.


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


def _loss_fn(subject: Subject):
    """`(variables, batch, *, step, dropout_rng) -> (total, (terms, updates))`: the run's training loss."""
    from adaparse_jax import train as training

    return functools.partial(
        training.training_loss, subject.model,
        label_table=jnp.asarray(subject.data.train_labels, jnp.float32),
        class_weights={k: jnp.asarray(v, jnp.float32) for k, v in subject.data.class_weights.items()},
        loss_config=subject.config.loss)


# ------------------------------------------------------------------------------------------------
# Parameter groups.


def group_of(path: str) -> str:
    """The group of a parameter path such as 'fen/shared/block1/conv/kernel' (`PARAM_GROUPS`)."""
    for prefix, group in PARAM_GROUPS:
        if path.startswith(prefix):
            return group
    return path.split("/", 1)[0]


def _flat(tree) -> dict[str, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _group_rank(group: str) -> tuple[int, str]:
    """Network order: the groups of `PARAM_GROUPS` in its order, then the others alphabetically
    (the FEN before the parser)."""
    table = list(dict.fromkeys(g for _, g in PARAM_GROUPS))
    return (table.index(group) if group in table else len(table), group)


def group_names(params) -> list[str]:
    """The groups present in a parameter tree, in network order."""
    return sorted({group_of(p) for p in _flat(params)}, key=_group_rank)


def group_norms(tree) -> dict[str, jax.Array]:
    """{group: L2 norm of the tree's leaves in that group}, plus `ALL`: the norm of the whole tree
    (computed from the leaves, not from the group norms)."""
    flat = _flat(tree)
    sq: dict[str, Any] = {}
    for path, leaf in flat.items():
        g = group_of(path)
        sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    out = {g: jnp.sqrt(v) for g, v in sq.items()}
    out[ALL] = optax.tree.norm(tree)
    return out


# ------------------------------------------------------------------------------------------------
# The sample.


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


def _batch_key(seed: int, i: int) -> jax.Array:
    """The dropout key of the sample's batch i (the same in the gradient and activation passes)."""
    return jax.random.fold_in(jax.random.key(seed), i)


# ------------------------------------------------------------------------------------------------
# 1. Loss terms and their gradients.


def term_gradients(loss_fn, params, batch_stats, batches: Sequence[dict], *, step: int,
                   seed: int = 0) -> dict:
    """Every loss term's value and gradient norms per parameter group, on the mean over `batches`.

    Args:
      loss_fn: `(variables, batch, *, step, dropout_rng) -> (total, (terms, updates))`, e.g.
        `train.training_loss` with its model, labels, class weights and loss config bound.
      params, batch_stats: the model variables.

    Returns:
      values: {term: mean over batches}; norms: {row: {group: norm, ALL: norm}} with a row per
      term and the rows CONSTRAINTS, CROSS_ENTROPIES and TOTAL (the sums' gradients);
      ce_sq: pytree like params, the mean over batches of the squared gradient of the
      cross-entropies' sum (what `adam_step_ratio` reads).
    """
    keys = [_batch_key(seed, i) for i in range(len(batches))]
    # The term names in total_loss's order (without 'total'), from one abstract evaluation.
    names = [n for n in jax.eval_shape(
        lambda: loss_fn({"params": params, "batch_stats": batch_stats}, batches[0], step=step,
                        dropout_rng=keys[0])[1][0]) if n != "total"]

    def term_loss(p, batch, key, weights):
        _, (terms, _) = loss_fn({"params": p, "batch_stats": batch_stats}, batch, step=step,
                                dropout_rng=key)
        vec = jnp.stack([terms[n] for n in names])
        return jnp.dot(weights, vec), vec

    # One compilation for every term: the term is chosen by a one-hot weight vector.
    grad_fn = jax.jit(jax.grad(term_loss, has_aux=True))
    norms_fn = jax.jit(group_norms)
    add = jax.jit(lambda a, b, s: jax.tree.map(lambda x, y: x + s * y, a, b))
    square_mean = jax.jit(lambda trees: jax.tree.map(lambda *xs: sum(x * x for x in xs) / len(xs),
                                                     *trees))
    ce_names = {t.name for t in targets.CLASSIFICATION_TARGETS}
    families = {CONSTRAINTS: set(losses.CONSTRAINT_TERMS), CROSS_ENTROPIES: ce_names,
                TOTAL: set(names)}
    acc = {f: None for f in families}
    ce_by_batch: list[Any] = [None] * len(batches)
    values, norms = {}, {}
    inv = 1.0 / len(batches)
    for name in names:
        weights = jnp.asarray(np.eye(len(names), dtype=np.float32)[names.index(name)])
        mean = None
        value = 0.0
        for i, (batch, key) in enumerate(zip(batches, keys, strict=True)):
            g, vec = grad_fn(params, batch, key, weights)
            value += float(vec[names.index(name)]) * inv
            mean = jax.tree.map(lambda x: x * inv, g) if mean is None else add(mean, g, inv)
            if name in ce_names:
                ce_by_batch[i] = g if ce_by_batch[i] is None else add(ce_by_batch[i], g, 1.0)
        values[name] = value
        norms[name] = {k: float(v) for k, v in norms_fn(mean).items()}
        for fam, members in families.items():
            if name in members:
                acc[fam] = mean if acc[fam] is None else add(acc[fam], mean, 1.0)
    for fam, tree in acc.items():
        norms[fam] = {k: float(v) for k, v in norms_fn(tree).items()}
    values[TOTAL] = sum(values[n] for n in names)
    return {"values": values, "norms": norms, "ce_sq": square_mean(ce_by_batch)}


# ------------------------------------------------------------------------------------------------
# 2. Adam's effective step ratio.


def adam_moments(opt_state):
    """The `optax.ScaleByAdamState` inside an optimiser state (raises if there is none or several)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise DiagnoseError(f"the optimiser state holds {len(found)} Adam states; expected one")
    return found[0]


def adam_step_ratio(grad_sq, opt_state, *, b2: float, eps: float,
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> dict:
    """Per group, quantiles of sqrt(grad_sq) / (sqrt(v_hat) + eps) over the group's parameters.

    v_hat = nu / (1 - b2^count), Adam's bias-corrected second moment. With `grad_sq` the mean
    squared per-batch gradient of some losses, a ratio of 1 is a parameter whose Adam steps those
    losses alone would make about the learning rate long; 0.01 is one they move 100x less.

    Returns {'count': Adam's step count, 'groups': {group: {'q10', 'median', 'q90', 'parameters'}}}.
    """
    adam = adam_moments(opt_state)
    count = int(adam.count)
    if count == 0:
        raise DiagnoseError("Adam's step count is 0: no second moments yet")
    correction = 1.0 - b2 ** count
    g_flat, v_flat = _flat(jax.device_get(grad_sq)), _flat(jax.device_get(adam.nu))
    if set(g_flat) != set(v_flat):
        raise DiagnoseError("the gradient and Adam's moments have different parameter trees")
    per_group: dict[str, list] = {}
    for path, g2 in g_flat.items():
        v_hat = np.asarray(v_flat[path], np.float64) / correction
        ratio = np.sqrt(np.asarray(g2, np.float64)) / (np.sqrt(v_hat) + eps)
        per_group.setdefault(group_of(path), []).append(ratio.ravel())
    groups = {}
    for g, parts in sorted(per_group.items(), key=lambda kv: _group_rank(kv[0])):
        r = np.concatenate(parts)
        q = np.quantile(r, quantiles)
        groups[g] = {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]),
                     "parameters": int(r.size)}
    return {"count": count, "groups": groups}


# ------------------------------------------------------------------------------------------------
# 3. Activations and 4. fingerprints, from one training-mode pass per batch.


def _capture(module, method_name: str, calls: list | None = None) -> bool:
    """capture_intermediates filter: the layers of `RELU_LAYERS` and `HEAD_LAYERS`; their paths are
    appended to `calls` in the order the model calls them (when it traces)."""
    path = "/".join(module.path)
    keep = method_name == "__call__" and bool(RELU_LAYERS.search(path) or HEAD_LAYERS.match(path))
    if keep and calls is not None:
        calls.append(path)
    return keep


def _layer_moments(x: jax.Array, relu: bool, batch: int) -> dict:
    """Per-batch statistics of one layer output [B or B*T, ..., C] (the image axis outermost)."""
    units = x.reshape(-1, x.shape[-1]) > 0
    a = jnp.maximum(x, 0) if relu else x
    a = a.astype(jnp.float32).reshape(batch, -1)
    mean = a.mean(0)
    return {"mean": mean, "m2": jnp.sum(jnp.square(a - mean), 0),
            "ever": units.any(0), "always": units.all(0)}


def activation_pass(model, params, batch_stats, batches: Sequence[dict], *, seed: int = 0,
                    fingerprint_heads: Sequence[int] | None = None) -> dict:
    """Layer statistics over `batches` (training mode, the gradient pass's dropout keys).

    Returns:
      layers: {path: {'kind': 'relu' | 'head', 'units', 'dead', 'always_on', 'spread', 'std'}}:
        dead / always_on: fractions of units (last axis) never / always > 0 on every image and
        position; spread: RMS over elements of the std across images / RMS of the mean across
        images (after the ReLU for ReLU layers); std: that RMS std.
      fingerprints: float32 [N, len(fingerprint_heads), S, S, 3] (all heads when None);
      fingerprint_rms, input_rms: RMS of every fingerprint and of the normalised input.
    """

    calls: list[str] = []  # the captured layers in call order (network order)

    def forward(p, batch, key):
        x = pipeline.normalize(batch["image"])
        out, state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 rngs={"dropout": key},
                                 capture_intermediates=functools.partial(_capture, calls=calls),
                                 mutable=["batch_stats", "intermediates"])
        b = x.shape[0]
        stats = {}
        for path, value in _flat(state["intermediates"]).items():
            if not path.endswith("/__call__"):  # sown values (the parser's features), not layers
                continue
            path = path.removesuffix("/__call__")
            stats[path] = _layer_moments(value[0], bool(RELU_LAYERS.search(path)), b)
        fp = out["fingerprints"]
        return {"stats": stats,
                "fingerprints": (fp if fingerprint_heads is None else fp[:, list(fingerprint_heads)]
                                 ).astype(jnp.float32),
                "fp_sq": jnp.mean(jnp.square(fp.astype(jnp.float32))),
                "x_sq": jnp.mean(jnp.square(x))}

    forward = jax.jit(forward)
    merged: dict[str, dict] = {}
    n = 0
    fps, fp_sq, x_sq = [], [], []
    for i, batch in enumerate(batches):
        res = jax.device_get(forward(params, batch, _batch_key(seed, i)))
        nb = int(batch["image"].shape[0])
        for path, s in res["stats"].items():
            mean, m2 = np.asarray(s["mean"], np.float64), np.asarray(s["m2"], np.float64)
            m = merged.get(path)
            if m is None:
                merged[path] = {"mean": mean, "m2": m2, "ever": s["ever"], "always": s["always"]}
                continue
            # Chan et al.'s parallel update: exact pooled mean and sum of squared deviations.
            delta = mean - m["mean"]
            total = n + nb
            m["m2"] = m["m2"] + m2 + np.square(delta) * n * nb / total
            m["mean"] = m["mean"] + delta * nb / total
            m["ever"] = m["ever"] | s["ever"]
            m["always"] = m["always"] & s["always"]
        n += nb
        fps.append(res["fingerprints"])
        fp_sq.append(float(res["fp_sq"]))
        x_sq.append(float(res["x_sq"]))
    layers = {}
    for path, m in merged.items():
        var = m["m2"] / n
        std = float(np.sqrt(var.mean()))
        const = float(np.sqrt(np.square(m["mean"]).mean()))
        layers[path] = {"kind": "relu" if RELU_LAYERS.search(path) else "head",
                        "units": int(m["ever"].size),
                        "dead": float(np.mean(~m["ever"])), "always_on": float(np.mean(m["always"])),
                        "spread": std / const if const > 0 else None, "std": std}
    order = list(dict.fromkeys(calls))
    return {"layers": {p: layers[p] for p in sorted(layers, key=order.index)}, "fingerprints": np.concatenate(fps),
            "fingerprint_rms": float(np.sqrt(np.mean(fp_sq))), "input_rms": float(np.sqrt(np.mean(x_sq)))}


# ------------------------------------------------------------------------------------------------
# 4. The probe.


def probe_f1(features: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray]) -> float | None:
    """Held-out macro F1 of the spectral probe's classifier, per image, grouped by generator.

    `folds` are the held-out image indices of each fold (no generator in two folds); None when a
    fold's training images hold a single class."""
    from sklearn.metrics import f1_score

    units = {str(i): features[i:i + 1] for i in range(len(features))}
    fold_units = {str(k): [str(i) for i in fold] for k, fold in enumerate(folds)}
    for fold in folds:
        rest = np.setdiff1d(np.arange(len(labels)), fold)
        if len(np.unique(labels[rest])) < 2:
            return None
    truth, decided = probe_lib.held_out_decisions(units, {str(i): int(y) for i, y in enumerate(labels)},
                                                  fold_units)
    return float(f1_score(truth, decided, average="macro", zero_division=0))


def probe_folds(labels: np.ndarray, groups: np.ndarray, seed: int) -> list[np.ndarray] | None:
    """Held-out image indices of up to PROBE_FOLDS folds by generator, stratified by label; None
    with fewer than two generators or one class."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = min(PROBE_FOLDS, len(np.unique(groups)))
    if k < 2 or len(np.unique(labels)) < 2:
        return None
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # small samples: a class with fewer members than folds is fine
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [test for _, test in cv.split(np.zeros(len(labels)), labels, groups)]


def fingerprint_probe(images_u8: np.ndarray, fingerprints: np.ndarray, generators: np.ndarray,
                      label_rows: np.ndarray, *, seed: int = 0) -> dict:
    """Per discrete attribute, held-out macro F1 of the probe on the images and on the fingerprints.

    Args:
      images_u8: [N, S, S, 3] uint8.
      fingerprints: [N, T, S, S, 3]: T = 6, one per discrete attribute (`targets.DISCRETE_TARGETS`
        order), or T = 1 (RE-Net: the same fingerprint for every attribute).
      generators: [N] generator rows (the folds' groups); label_rows: [N, 28] true labels.
    """
    image_features = probe_lib.spectral_features(images_u8)
    out = {}
    for i, t in enumerate(targets.DISCRETE_TARGETS):
        y = label_rows[:, targets.column_index(t.name)].astype(np.int64)
        folds = probe_folds(y, generators, seed)
        row = {"generators": int(len(np.unique(generators))), "classes": int(len(np.unique(y))),
               "image": None, "fingerprint": None}
        if folds is not None:
            fp = fingerprints[:, i if fingerprints.shape[1] > 1 else 0]
            row["image"] = probe_f1(image_features, y, folds)
            row["fingerprint"] = probe_f1(probe_lib.spectral_features(fp), y, folds)
        out[t.name] = row
    return out


# ------------------------------------------------------------------------------------------------
# The report.


def diagnose(subject: Subject, *, images: int = 64, seed: int = 0) -> dict:
    """The four sections on `images` training images of `subject` (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = subject.config
    data = subject.data
    records = sample_records(data, images, seed)
    batches = batches_of(data, records, cfg.batch_size)
    used = records[:sum(int(b["image"].shape[0]) for b in batches)]
    gens = data.cache.generator[used]

    grads = term_gradients(_loss_fn(subject), subject.params, subject.batch_stats, batches,
                           step=subject.step, seed=seed)
    groups = group_names(subject.params)
    counts = {g: 0 for g in groups}
    for path, leaf in _flat(subject.params).items():
        counts[group_of(path)] += int(np.prod(leaf.shape))

    if subject.opt_state is None:
        adam = {"available": False, "reason": "fresh initialisation: Adam has no second moments yet"}
    else:
        adam = {"available": True, **adam_step_ratio(grads["ce_sq"], subject.opt_state,
                                                     b2=cfg.optimizer.b2, eps=cfg.optimizer.eps)}

    arch = cfg.model.arch
    heads = [targets.head_index(t.name) for t in targets.DISCRETE_TARGETS] if arch == "adaparse" else None
    acts = activation_pass(subject.model, subject.params, subject.batch_stats, batches, seed=seed,
                           fingerprint_heads=heads)
    probe = fingerprint_probe(data.cache.read(used), acts["fingerprints"], gens,
                              np.asarray(data.dataset.labels)[gens], seed=seed)

    factor = float(losses.constraint_factor(subject.step, loss_config=cfg.loss))
    norms = grads["norms"]
    ratio = {g: (norms[CONSTRAINTS][g] / norms[CROSS_ENTROPIES][g]
                 if norms[CROSS_ENTROPIES][g] > 0 else None) for g in [*groups, ALL]}
    return {
        "source": {**subject.source, "arch": arch, "step": subject.step,
                   "dataset": data.dataset.name, "split": str(cfg.split),
                   "images": int(len(used)), "generators": int(len(np.unique(gens))),
                   "batch_size": int(batches[0]["image"].shape[0]), "seed": seed,
                   "random_gt": bool(cfg.random_gt), "constraint_factor": factor,
                   "optimizer": {k: cfg.optimizer[k] for k in cfg.optimizer},
                   "seconds": round(time.perf_counter() - t0, 1)},
        "groups": groups,
        "parameters": counts,
        "terms": grads["values"],
        "gradients": norms,
        "constraint_to_ce_ratio": ratio,
        "adam": adam,
        "activations": acts["layers"],
        "fingerprint_rms": acts["fingerprint_rms"],
        "input_rms": acts["input_rms"],
        "probe": probe,
    }


def _num(v, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: Mapping) -> str:
    """The report as Markdown (the tables of diagnose.md)."""
    s = report["source"]
    groups = report["groups"]
    where = (f"`{s['workdir']}` checkpoint {s['checkpoint']} ({s['checkpoint_choice']})"
             if "workdir" in s else f"fresh initialisation (seed {s['seed']}) on `{s['dataset']}`")
    opt = s["optimizer"]
    lines = [
        f"# Diagnosis: {s['arch']} at step {s['step']}",
        "",
        f"{where}; {s['images']} training images of {s['generators']} generators ({s['dataset']}, "
        f"split {s['split']}{', Random G.T. labels' if s['random_gt'] else ''}), batches of "
        f"{s['batch_size']}, seed {s['seed']}; constraint weights x {s['constraint_factor']:.3g} at "
        f"this step; optimizer " + ", ".join(f"{k} {v:g}" for k, v in opt.items())
        + f" ({s['seconds']} s).",
        "",
        "## Loss terms and gradient norms per parameter group",
        "",
        "Gradient of the mean over the sample's batches (BatchNorm in training mode, as in a step).",
        "",
        "| term | value | " + " | ".join(groups) + f" | {ALL} |",
        "|---|---:|" + "---:|" * (len(groups) + 1),
        "| (parameters) | | " + " | ".join(f"{report['parameters'][g]:,}" for g in groups) + f" | "
        f"{sum(report['parameters'].values()):,} |",
    ]
    grad, terms = report["gradients"], report["terms"]
    summary = (CONSTRAINTS, CROSS_ENTROPIES, TOTAL)
    for name in [n for n in grad if n not in summary] + list(summary):
        value = "" if name in (CONSTRAINTS, CROSS_ENTROPIES) else _num(terms.get(name), ".4g")
        label = f"**{name}**" if name in summary else name
        lines.append(f"| {label} | {value} | " + " | ".join(_num(grad[name][g], ".2e") for g in groups)
                     + f" | {_num(grad[name][ALL], '.2e')} |")
    ratio = report["constraint_to_ce_ratio"]
    lines.append("| **constraints / cross-entropies** | | "
                 + " | ".join(_num(ratio[g], ".3g") for g in groups) + f" | {_num(ratio[ALL], '.3g')} |")
    lines += ["", "## Adam's effective step ratio of the cross-entropies", ""]
    adam = report["adam"]
    if not adam["available"]:
        lines.append(f"Not available: {adam['reason']}.")
    else:
        lines += [
            f"Per parameter: RMS over batches of the cross-entropies' gradient / (sqrt(v_hat) + eps), "
            f"Adam step {adam['count']}. 1: those losses move the parameter about the learning rate "
            "per step; 0.01: 100x less.",
            "",
            "| group | parameters | 10 % | median | 90 % |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {g} | {r['parameters']:,} | {r['q10']:.3g} | {r['median']:.3g} | {r['q90']:.3g} |"
                  for g, r in adam["groups"].items()]
    lines += [
        "", "## Activations (training-mode pass over the sample)", "",
        "dead / always on: fraction of a ReLU layer's units (channels) never / always active on any "
        "image and position; spread: image-dependent std / |mean| (RMS over elements, after the "
        "ReLU); std: that RMS std (for a head: its logits' variation across images).",
        "",
        "| layer | units | dead | always on | spread | std |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, a in report["activations"].items():
        dead = (f"{a['dead']:.2f} | {a['always_on']:.2f}" if a["kind"] == "relu" else " | ")
        lines.append(f"| {path} | {a['units']} | {dead} | {_num(a['spread'])} | {a['std']:.3g} |")
    lines += [
        "", "## Probe: spectral features of images vs fingerprints", "",
        f"Logistic regression on `zoo.probe.spectral_features`, grouped k-fold by generator over the "
        f"sample, held-out macro F1 per image. Fingerprint RMS {report['fingerprint_rms']:.3g} "
        f"(input, normalised: {report['input_rms']:.3g}).",
        "",
        "| attribute | classes | generators | images F1 | fingerprint F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["probe"].items():
        lines.append(f"| {targets.BY_NAME[name].title} | {r['classes']} | {r['generators']} | "
                     f"{_num(r['image'], '.3f')} | {_num(r['fingerprint'], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: str | os.PathLike) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / MARKDOWN, "json": out / JSON}
    paths["markdown"].write_text(markdown(report))
    paths["json"].write_text(json.dumps(report, indent=1))
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adaparse_jax.diagnose", allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides (--config.<field>=<value>) go with --config.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run directory: diagnose its checkpoint")
    src.add_argument("--config", help="CONFIG_FILE[:arg]: diagnose a fresh initialisation")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: the run's selected checkpoint)")
    p.add_argument("--dataset", default=None,
                   help="with --config: a dataset directory or dataset.json (e.g. a zoo)")
    p.add_argument("--images", type=int, default=64, help="training images in the sample (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the dropout keys")
    p.add_argument("--out", default=None,
                   help="output directory (default <workdir>/diagnose[_step<N>]; required with --config)")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    try:
        if unknown:
            raise DiagnoseError(f"unrecognised arguments: {' '.join(unknown)}")
        if args.workdir is not None:
            if overrides or args.dataset:
                raise DiagnoseError("--config.<field> overrides and --dataset go with --config, "
                                    "not --workdir (a run is diagnosed with its own config)")
            subject = load_checkpoint(args.workdir, args.step)
            out = args.out or Path(subject.source["workdir"]) / (
                "diagnose" if args.step is None else f"diagnose_step{args.step}")
        else:
            from adaparse_jax import train as training

            if args.out is None:
                raise DiagnoseError("--out is required with --config")
            if args.step is not None:
                raise DiagnoseError("--step goes with --workdir")
            config = training.load_config(args.config, overrides)
            if args.dataset:
                config.data.dataset = str(Path(args.dataset).expanduser().resolve())
                config.data.generate = ""
                config.data.images = config.data.labels = ""
            subject = initialise(config, args.out)
            out = args.out
        report = diagnose(subject, images=args.images, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:  # ConfigError, DatasetError, CheckpointMismatchError
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write_report(report, out)
    print(markdown(report))
    print(f"wrote {files['markdown']} and {files['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
