"""Held-out statistics of k-fold runs: pooled predictions, macro F1 from confusion counts,
permutation tests (generator-level macro F1, L1) and the scores of one replicate.

What they mean and why: `adaparse_jax.scoring`'s docstring. This module depends on metrics and
targets only, so the zoo's spectral probe scores itself the same way without the training stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
from sklearn.metrics import f1_score

from adaparse_jax import metrics as metrics_lib
from adaparse_jax import targets

N_RESAMPLES = 9999
# Permutations evaluated per vectorised call (memory ~ batch x G x K floats).
_BATCH = 2000
FAMILIES = {
    "discrete": targets.DISCRETE_TARGETS,
    "flags": targets.FLAG_TARGETS,
    "groups": targets.GROUPS,
    "continuous": targets.CONTINUOUS_TARGETS,
}


# ------------------------------------------------------------------------------------------------
# Held-out predictions of one replicate, pooled over folds.


@dataclasses.dataclass
class HeldOut:
    """Per-image held-out predictions of one replicate (all its folds), and their generators.

    predictions: {'continuous': [M, 9], name: int [M]} (`metrics.predictions_from_outputs` form).
    generators: [M] dataset row of each image's generator. label_rows: [M, 28] its true labels.
    folds: [M] the split (fold) in which each image was held out. workdirs: the runs pooled.
    """

    predictions: dict
    generators: np.ndarray
    label_rows: np.ndarray
    folds: np.ndarray
    workdirs: list[str]


def _decision_keys() -> list[str]:
    return [targets.CONTINUOUS] + [t.name for t in targets.CLASSIFICATION_TARGETS]


def pool(parts: Sequence[tuple[str, Mapping]], workdirs: Sequence[str] = ()) -> HeldOut:
    """Pool the test predictions of k folds into one HeldOut.

    Args:
      parts: (fold name, predictions) per fold; predictions hold the decision keys plus
        'generator' [M] and 'label_rows' [M, 28] (as `evaluation.load_predictions` returns them).

    Raises ValueError when two folds hold out the same generator or a fold appears twice.
    """
    folds = [f for f, _ in parts]
    if len(set(folds)) != len(folds):
        raise ValueError(f"fold(s) {sorted({f for f in folds if folds.count(f) > 1})} appear twice "
                         f"among the runs {list(workdirs)}; give each fold one run per replicate")
    seen: dict[int, str] = {}
    for fold, p in parts:
        for g in np.unique(p["generator"]).tolist():
            if g in seen:
                raise ValueError(f"generator row {g} is held out in fold {seen[g]} and in fold {fold}: "
                                 f"the folds of {list(workdirs)} overlap")
            seen[g] = fold
    cat = {k: np.concatenate([np.asarray(p[k]) for _, p in parts]) for k in _decision_keys()}
    return HeldOut(
        predictions=cat,
        generators=np.concatenate([np.asarray(p["generator"], np.int64) for _, p in parts]),
        label_rows=np.concatenate([np.asarray(p["label_rows"], np.float64) for _, p in parts]),
        folds=np.concatenate([np.full(len(p["generator"]), str(f)) for f, p in parts]),
        workdirs=list(workdirs))


# ------------------------------------------------------------------------------------------------
# Statistics.


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Macro F1 of confusion matrices [..., K, K] (rows true, columns predicted).

    Equals `sklearn.metrics.f1_score(y, yhat, average='macro', zero_division=0)` of the labels
    behind each matrix: per class 2 TP / (2 TP + FP + FN), averaged over the classes that occur
    in labels or decisions. Vectorised, so a permutation null of thousands of draws is one call.
    """
    c = np.asarray(confusion, np.float64)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    true_n, pred_n = c.sum(axis=-1), c.sum(axis=-2)
    denom = true_n + pred_n
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.where(present, denom, 1.0), 0.0)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def decision_counts(class_ids, generators, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(generator ids [G] increasing, counts [G, K]: images of each generator decided as class k)."""
    ids, inverse = np.unique(np.asarray(generators), return_inverse=True)
    y = np.asarray(class_ids, np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class ids outside 0..{num_classes - 1}")
    counts = np.zeros((len(ids), num_classes), np.float64)
    np.add.at(counts, (inverse, y), 1.0)
    return ids, counts


@dataclasses.dataclass(frozen=True)
class Permutation:
    """A statistic, its permutation p-value, and the mean and std of its null distribution."""

    statistic: float
    pvalue: float
    null_mean: float
    null_std: float


def _result(res) -> Permutation:
    null = np.asarray(res.null_distribution, np.float64)
    return Permutation(float(res.statistic), float(res.pvalue), float(null.mean()), float(null.std()))


def permutation_test(labels, counts, num_classes: int, *, n_resamples: int = N_RESAMPLES,
                     seed: int = 0) -> Permutation:
    """Macro F1 of decisions against generator labels, and its generator-permutation p-value.

    Args:
      labels: [G] class id of each held-out generator.
      counts: [G, K] decisions per generator: one-hot rows for generator-level decisions, or the
        number of each generator's images decided as each class (`decision_counts`) for the
        image level (each image then takes its generator's label, permuted with it).
      num_classes: K.

    Returns the observed macro F1, p = (1 + #{F1 under a permutation of the labels among the G
    generators >= observed}) / (1 + n_resamples) (exact over all G! permutations when that is
    fewer), and the null distribution's mean and std (the F1 expected by chance from these
    decisions).
    """
    y = np.asarray(labels, np.int64)
    n = np.asarray(counts, np.float64)
    if n.shape != (len(y), num_classes):
        raise ValueError(f"counts have shape {n.shape}; expected [{len(y)}, {num_classes}]")
    onehot = np.eye(num_classes)[y]  # [G, K]

    def f1(order, axis=-1):
        order = np.moveaxis(np.asarray(order), axis, -1)
        # confusion[t, p] = sum_g [label of generator order[g] == t] * counts[g, p]
        confusion = np.einsum("...gt,gp->...tp", onehot[order], n)
        return macro_f1_from_confusion(confusion)

    res = scipy.stats.permutation_test((np.arange(len(y)),), f1, permutation_type="pairings",
                                       vectorized=True, n_resamples=n_resamples,
                                       alternative="greater", batch=_BATCH, rng=seed)
    return _result(res)


def l1_permutation_test(labels, predictions, *, n_resamples: int = N_RESAMPLES,
                        seed: int = 0) -> Permutation:
    """Mean L1 error of one prediction per generator, and its generator-permutation p-value.

    Args:
      labels: [G] true values. predictions: [G] predicted values.

    p = (1 + #{L1 with the labels permuted among the G generators <= observed}) / (1 + n_resamples):
    small when the predictions track the labels better than any assignment that ignores them.
    """
    y = np.asarray(labels, np.float64)
    p = np.asarray(predictions, np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must be matching [G] arrays")

    def l1(order, axis=-1):
        order = np.moveaxis(np.asarray(order), axis, -1)
        return np.abs(y[order] - p).mean(axis=-1)

    res = scipy.stats.permutation_test((np.arange(len(y)),), l1, permutation_type="pairings",
                                       vectorized=True, n_resamples=n_resamples, alternative="less",
                                       batch=_BATCH, rng=seed)
    return _result(res)


# ------------------------------------------------------------------------------------------------
# Scoring one replicate.


def score_held_out(held: HeldOut, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                   with_pvalues: bool = True) -> dict:
    """Per-target scores of pooled held-out predictions.

    Returns {'num_generators', 'num_images', 'targets': {name: entry}, 'means': {...}} where a
    classification entry holds f1_generator, f1_image (sklearn), acc_generator, acc_image and,
    with p-values, p_generator, p_image, chance_generator, chance_image (null means); a continuous
    entry holds l1_generator, l1_image and p_generator, chance_generator. 'means' averages
    f1_generator / f1_image (l1_... for counts) over each family of `FAMILIES`.
    """
    preds, gens = held.predictions, held.generators
    gen_rows, ids = metrics_lib.generator_label_rows(held.label_rows, gens)
    agg, agg_ids = metrics_lib.aggregate_by_generator(preds, gens, num_images=None)
    if not np.array_equal(ids, agg_ids):  # an internal invariant, kept under python -O
        raise RuntimeError(f"per-generator aggregation returned generators {agg_ids}, expected {ids}")
    gen_labels = targets.split_labels(gen_rows)
    img_labels = targets.split_labels(held.label_rows)
    out: dict = {"num_generators": int(len(ids)), "num_images": int(len(gens)), "targets": {}}
    for t in targets.CLASSIFICATION_TARGETS:
        yg, yi = np.asarray(gen_labels[t.name]), np.asarray(img_labels[t.name])
        dg, di = np.asarray(agg[t.name], np.int64), np.asarray(preds[t.name], np.int64)
        entry = {
            "f1_generator": float(f1_score(yg, dg, average="macro", zero_division=0)),
            "f1_image": float(f1_score(yi, di, average="macro", zero_division=0)),
            "acc_generator": float(np.mean(yg == dg)),
            "acc_image": float(np.mean(yi == di)),
        }
        if with_pvalues:
            pg = permutation_test(yg, np.eye(t.num_classes)[dg], t.num_classes,
                                  n_resamples=n_resamples, seed=seed)
            _, counts = decision_counts(di, gens, t.num_classes)
            pi = permutation_test(yg, counts, t.num_classes, n_resamples=n_resamples, seed=seed)
            entry.update(p_generator=pg.pvalue, p_image=pi.pvalue, chance_generator=pg.null_mean,
                         chance_image=pi.null_mean)
        out["targets"][t.name] = entry
    cont_g = np.asarray(agg[targets.CONTINUOUS], np.float64)
    cont_i = np.asarray(preds[targets.CONTINUOUS], np.float64)
    yg_c = np.asarray(gen_labels[targets.CONTINUOUS], np.float64)
    yi_c = np.asarray(img_labels[targets.CONTINUOUS], np.float64)
    for j, t in enumerate(targets.CONTINUOUS_TARGETS):
        entry = {"l1_generator": float(np.abs(cont_g[:, j] - yg_c[:, j]).mean()),
                 "l1_image": float(np.abs(cont_i[:, j] - yi_c[:, j]).mean())}
        if with_pvalues:
            pg = l1_permutation_test(yg_c[:, j], cont_g[:, j], n_resamples=n_resamples, seed=seed)
            entry.update(p_generator=pg.pvalue, chance_generator=pg.null_mean)
        out["targets"][t.name] = entry
    means = {}
    for family, members in FAMILIES.items():
        keys = ("l1_generator", "l1_image") if family == "continuous" else ("f1_generator", "f1_image")
        for k in keys:
            means[f"{family}/{k}"] = float(np.mean([out["targets"][t.name][k] for t in members]))
    out["means"] = means
    return out
