"""Evaluation metrics of model parsing, on the host (NumPy and scikit-learn).

Per target, as the official evaluation computes them: L1 error for the 9 continuous targets; accuracy
and macro F1 (`sklearn.metrics.f1_score(average='macro', zero_division=0)`, over the classes present
in labels or predictions) for the 6 discrete targets, the 3 loss groups and the 10 loss flags.

Two granularities:

* per image: every image's prediction is scored against its generator's labels;
* per generator (RE-Net's evaluation with N images per generator): N images of each generator are
  drawn (deterministically from a seed), their predictions aggregated into one (mean of the
  continuous values, majority vote of the class ids, ties to the smaller id), and the generators
  are scored. N = 1, 10, 100 and all images by default.

Metric names are slash-separated: 'l1/layers', 'acc/skip', 'f1/normalization', 'f1/l1' (the L1
loss flag), with means 'l1/continuous_mean', 'f1/discrete_mean', 'f1/groups_mean',
'f1/flags_mean' (and 'acc/...' likewise); per-generator metrics carry a prefix
'generator_n10/...', 'generator_all/...'. Every list of targets comes from `targets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score

from adaparse_jax import targets

DEFAULT_IMAGES_PER_GENERATOR = (1, 10, 100, None)  # None: all images of each generator

# Targets averaged into each '<metric>/<family>_mean' entry.
_FAMILIES = {
    "discrete": targets.DISCRETE_TARGETS,
    "groups": targets.GROUPS,
    "flags": targets.FLAG_TARGETS,
}


def predictions_from_outputs(outputs: Mapping) -> dict:
    """Model outputs -> decisions: {'continuous': [B, 9], name: int32 [B] class ids}.

    Class ids are the argmax of `probs` for every discrete target, group and flag. For a flag the
    gated probabilities are used, as officially; the gate scales both classes by the same factor, so
    the decision equals the argmax of the flag head alone. Works on NumPy and JAX arrays (and inside
    `jax.jit`).
    """
    out = {targets.CONTINUOUS: outputs["continuous"]}
    for t in targets.CLASSIFICATION_TARGETS:
        out[t.name] = outputs["probs"][t.name].argmax(axis=-1).astype(np.int32)
    return out


def _check_predictions(predictions: Mapping, num: int | None = None, what: str = "predictions") -> int:
    n_cont = len(targets.CONTINUOUS_TARGETS)
    missing = [k for k in (targets.CONTINUOUS, *(t.name for t in targets.CLASSIFICATION_TARGETS))
               if k not in predictions]
    if missing:
        raise KeyError(f"{what} is missing {missing}")
    cont = np.asarray(predictions[targets.CONTINUOUS])
    if cont.ndim != 2 or cont.shape[1] != n_cont:
        raise ValueError(f"{what}['continuous'] has shape {cont.shape}; expected [N, {n_cont}]")
    num = cont.shape[0] if num is None else num
    for k in (targets.CONTINUOUS, *(t.name for t in targets.CLASSIFICATION_TARGETS)):
        if len(predictions[k]) != num:
            raise ValueError(f"{what}[{k!r}] has {len(predictions[k])} rows; expected {num}")
    return num


def _label_rows(label_rows) -> np.ndarray:
    rows = np.asarray(label_rows)
    if rows.ndim != 2 or rows.shape[1] != targets.NUM_LABEL_COLUMNS:
        raise ValueError(f"label rows have shape {rows.shape}; expected [N, {targets.NUM_LABEL_COLUMNS}] "
                         "(targets.label_matrix rows)")
    return rows


def score(predictions: Mapping, label_rows) -> dict[str, float]:
    """Flat metrics of predictions against label rows, one prediction per row.

    Args:
      predictions: {'continuous': [N, 9], name: [N] class ids} (`predictions_from_outputs`).
      label_rows: [N, 28] label rows (`targets.label_matrix` rows of each prediction's generator).

    Returns:
      'l1/<continuous>', 'l1/continuous_mean', 'l1/continuous_std' (over the 9 targets, as the
      official script prints it), 'acc/<name>' and 'f1/<name>' for every classification target,
      and 'acc/<family>_mean', 'f1/<family>_mean' for discrete, groups and flags.
    """
    rows = _label_rows(label_rows)
    _check_predictions(predictions, rows.shape[0])
    labels = targets.split_labels(rows)
    out: dict[str, float] = {}
    err = np.abs(np.asarray(predictions[targets.CONTINUOUS], np.float64)
                 - np.asarray(labels[targets.CONTINUOUS], np.float64)).mean(axis=0)
    for t, e in zip(targets.CONTINUOUS_TARGETS, err):
        out[f"l1/{t.name}"] = float(e)
    out["l1/continuous_mean"] = float(err.mean())
    out["l1/continuous_std"] = float(err.std())
    for t in targets.CLASSIFICATION_TARGETS:
        y_true = np.asarray(labels[t.name])
        y_pred = np.asarray(predictions[t.name]).astype(np.int64)
        out[f"acc/{t.name}"] = float(np.mean(y_true == y_pred))  # sklearn's accuracy_score, without
        # its input checks (half the time of `score`, which evaluation calls tens of times per run)
        out[f"f1/{t.name}"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    for family, members in _FAMILIES.items():
        for metric in ("acc", "f1"):
            out[f"{metric}/{family}_mean"] = float(np.mean([out[f"{metric}/{t.name}"] for t in members]))
    return out


def metric_names() -> list[str]:
    """The names `score` returns (from a one-row call, so the list cannot drift from `score`)."""
    preds = {targets.CONTINUOUS: np.zeros((1, len(targets.CONTINUOUS_TARGETS)), np.float32),
             **{t.name: np.zeros(1, np.int32) for t in targets.CLASSIFICATION_TARGETS}}
    return list(score(preds, np.zeros((1, targets.NUM_LABEL_COLUMNS), np.float32)))


def majority_vote(class_ids, num_classes: int) -> int:
    """Most frequent class id; ties go to the smallest id."""
    counts = np.bincount(np.asarray(class_ids, np.int64), minlength=num_classes)
    return int(np.argmax(counts))


def sample_per_generator(generators, num_images: int | None, seed: int = 0) -> dict[int, np.ndarray]:
    """Indices of up to `num_images` images per generator, drawn without replacement.

    The draw for generator g depends only on (seed, g), so adding or removing other generators does
    not change it. num_images=None keeps every image. Returns {generator id: sorted indices}.
    """
    gens = np.asarray(generators)
    if gens.ndim != 1:
        raise ValueError(f"generators must be a 1-D array of generator ids, got shape {gens.shape}")
    if num_images is not None and num_images < 1:
        raise ValueError(f"images per generator must be >= 1 or None (all), got {num_images}")
    out = {}
    for g in np.unique(gens):
        idx = np.flatnonzero(gens == g)
        if num_images is not None and num_images < len(idx):
            rng = np.random.default_rng([seed, int(g)])
            idx = np.sort(rng.choice(idx, size=num_images, replace=False))
        out[int(g)] = idx
    return out


def aggregate_by_generator(predictions: Mapping, generators, *, num_images: int | None = None,
                           seed: int = 0) -> tuple[dict, np.ndarray]:
    """One prediction per generator from N of its images (see `sample_per_generator`).

    Continuous values are averaged; class ids (discrete, groups, flags) are majority-voted.

    Returns:
      (predictions with one row per generator, generator ids [G] in increasing order).
    """
    gens = np.asarray(generators)
    _check_predictions(predictions, len(gens))
    picks = sample_per_generator(gens, num_images, seed)
    ids = np.array(sorted(picks), np.int64)
    cont = np.asarray(predictions[targets.CONTINUOUS], np.float64)
    out = {targets.CONTINUOUS: np.stack([cont[picks[g]].mean(axis=0) for g in ids])}
    for t in targets.CLASSIFICATION_TARGETS:
        y = np.asarray(predictions[t.name])
        out[t.name] = np.array([majority_vote(y[picks[g]], t.num_classes) for g in ids], np.int32)
    return out, ids


def generator_label_rows(label_rows, generators) -> tuple[np.ndarray, np.ndarray]:
    """One label row per generator (ids in increasing order); all its images must agree."""
    rows = _label_rows(label_rows)
    gens = np.asarray(generators)
    if len(gens) != len(rows):
        raise ValueError(f"{len(gens)} generator ids for {len(rows)} label rows")
    ids = np.unique(gens)
    out = []
    for g in ids:
        r = rows[gens == g]
        if not np.all(r == r[0]):
            raise ValueError(f"generator {int(g)} has images with different label rows")
        out.append(r[0])
    return np.stack(out), ids


def compute_metrics(predictions: Mapping, label_rows, generators=None, *,
                    images_per_generator: Sequence[int | None] = DEFAULT_IMAGES_PER_GENERATOR,
                    seed: int = 0) -> dict[str, float]:
    """Per-image and per-generator metrics of a set of image predictions.

    Args:
      predictions: {'continuous': [M, 9], name: [M] class ids} for M images.
      label_rows: [M, 28] label row of each image's generator.
      generators: [M] generator id of each image; None gives the per-image metrics only.
      images_per_generator: the N of the per-generator metrics (None: all images).
      seed: seed of the per-generator draws.

    Returns:
      `score` of the images, then for each N the `score` of the generators prefixed
      'generator_n<N>/' (or 'generator_all/'), plus 'num_images' and 'num_generators'.
    """
    out = score(predictions, label_rows)
    out["num_images"] = float(len(np.asarray(label_rows)))
    if generators is None:
        return out
    gen_rows, ids = generator_label_rows(label_rows, generators)
    out["num_generators"] = float(len(ids))
    for n in images_per_generator:
        agg, agg_ids = aggregate_by_generator(predictions, generators, num_images=n, seed=seed)
        if not np.array_equal(agg_ids, ids):  # an internal invariant, kept under python -O
            raise RuntimeError(f"per-generator aggregation returned generators {agg_ids}, expected {ids}")
        prefix = "generator_all" if n is None else f"generator_n{n}"
        out.update({f"{prefix}/{k}": v for k, v in score(agg, gen_rows).items()})
    return out


def mean_mode_baseline(train_label_rows, num: int) -> dict:
    """The trivial parser: the training-label mean of each continuous target, the mode of each class.

    Args:
      train_label_rows: [G, 28] label rows to fit on (one per training generator, or one per
        training image to weight generators by their image counts).
      num: how many predictions to return (all identical).

    Returns:
      predictions in the form of `predictions_from_outputs`, with `num` rows.
    """
    rows = _label_rows(train_label_rows)
    if len(rows) == 0:
        raise ValueError("the mean/mode baseline needs at least one training label row")
    labels = targets.split_labels(rows)
    mean = np.asarray(labels[targets.CONTINUOUS], np.float64).mean(axis=0)
    out = {targets.CONTINUOUS: np.tile(mean.astype(np.float32), (num, 1))}
    for t in targets.CLASSIFICATION_TARGETS:
        out[t.name] = np.full(num, majority_vote(labels[t.name], t.num_classes), np.int32)
    return out
