"""A spectral probe of the fingerprints against the images (section 4)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from adaparse_jax import targets
from adaparse_jax.zoo import probe as probe_lib

PROBE_FOLDS = 5


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

