"""A small generated dataset in the dataset.json layout, for tests and `configs/tiny.py`.

No user data and no training of generators: each "generator" is a label row (drawn like RE-116's
tables) and its images are smooth random content plus a **fingerprint that is a function of the
labels**. Every target contributes a periodic pattern: a discrete target, flag or group picks one
frequency per class, a continuous target scales the amplitude of its own pattern by its value. So
the hyperparameters of a generator never seen in training are, in principle, readable from its
images (the same label -> pattern map holds for every generator), while the content varies from
image to image. (The tiny test models do not learn it in the minutes a CPU test affords; the
dataset exists to exercise the code on honest, label-dependent inputs.)

This is not the synthetic zoo (`adaparse_jax.zoo`, real generator networks trained briefly); it is
the fallback that is fast enough for unit tests: `write_dataset(out)` takes well under a second.

Layout written (docs/ARCHITECTURE.md, "Dataset directory"):

    out/dataset.json
    out/images/<GENERATOR>/<i>.png                 uint8 RGB, size x size
    out/labels/models.txt                          generator names, label-row order
    out/labels/splits.json                         {"test_splits": {"1": [...], ...}}
    out/labels/ground_truth_net_15dim.npy          [G, 15]
    out/labels/ground_truth_loss_10dim.npy         [G, 10]
    out/labels/ground_truth_loss_3dim.npy          [G, 3]   (OR of each group's member flags)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from adaparse_jax import targets

DATASET_JSON = {
    "name": "synthetic",
    "images": "images",
    "names": "labels/models.txt",
    "splits": "labels/splits.json",
    "labels": {
        targets.NET_TABLE: "labels/ground_truth_net_15dim.npy",
        targets.LOSS10_TABLE: "labels/ground_truth_loss_10dim.npy",
        targets.LOSS3_TABLE: "labels/ground_truth_loss_3dim.npy",
    },
}

# The label -> fingerprint map is fixed (independent of the dataset seed), so that every dataset
# written by this module shares one learnable relation between labels and images.
_PATTERN_SEED = 20240611
_AMPLITUDE = 10.0  # grey levels of one class pattern
_CONTENT_RANGE = (60.0, 190.0)
_NOISE = 2.0


def label_tables(num_generators: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid official-format tables: continuous in [0, 1], every class used about equally often.

    Discrete classes and flags cycle through their classes and are shuffled per column, so no
    column predicts another; the coarse groups are the OR of their member flags (the official
    gating membership, flags 1-5, 6-9, 10).
    """
    rng = np.random.default_rng(seed)
    g = num_generators
    net = np.zeros((g, targets.TABLE_COLUMNS[targets.NET_TABLE]))
    loss10 = np.zeros((g, targets.TABLE_COLUMNS[targets.LOSS10_TABLE]))
    loss3 = np.zeros((g, targets.TABLE_COLUMNS[targets.LOSS3_TABLE]))
    for t in targets.CONTINUOUS_TARGETS:
        net[:, t.column] = np.round(rng.random(g), 4)
    for t in targets.DISCRETE_TARGETS + targets.FLAG_TARGETS:
        table = net if t.table == targets.NET_TABLE else loss10
        table[:, t.column] = rng.permutation(np.arange(g) % t.num_classes)
    for group in targets.GROUPS:
        members = [targets.BY_NAME[m].column for m in group.members]
        loss3[:, group.column] = loss10[:, members].max(axis=1)
    return {targets.NET_TABLE: net, targets.LOSS10_TABLE: loss10, targets.LOSS3_TABLE: loss3}


def _patterns(size: int) -> dict[str, np.ndarray]:
    """name -> [K, size, size, 3] unit patterns, one per class (one for a continuous target)."""
    rng = np.random.default_rng(_PATTERN_SEED)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = {}
    for t in targets.LABEL_COLUMNS:
        k = 1 if t.kind == targets.CONTINUOUS else t.num_classes
        pats = []
        for _ in range(k):
            # Mid-to-high frequencies: where the generators' own artifacts live, and what a
            # fingerprint network is built to isolate from the smooth image content.
            u, v = rng.integers(size // 8, size // 2, size=2) * rng.choice([-1, 1], size=2)
            phase = rng.uniform(0, 2 * np.pi)
            colour = rng.uniform(0.2, 1.0, size=3)
            wave = np.cos(2 * np.pi * (u * xx + v * yy) / size + phase)
            pats.append(wave[..., None] * colour)
        out[t.name] = np.stack(pats)
    return out


def fingerprint(label_row: np.ndarray, size: int) -> np.ndarray:
    """The additive fingerprint [size, size, 3] (grey levels) of a generator with these labels.

    label_row: one [28] row of `targets.label_matrix` (LABEL_COLUMNS order).
    """
    pats = _patterns(size)
    fp = np.zeros((size, size, 3))
    for value, t in zip(label_row, targets.LABEL_COLUMNS, strict=True):
        if t.kind == targets.CONTINUOUS:
            fp += _AMPLITUDE * float(value) * pats[t.name][0]
        else:
            fp += _AMPLITUDE * pats[t.name][int(value)]
    # Keep the sum of 28 patterns at the scale of one: clipping would otherwise destroy it.
    return fp / np.sqrt(len(targets.LABEL_COLUMNS) / 4)


def _content(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random image content [size, size, 3]: a 4x4 colour field upsampled bilinearly."""
    low = rng.uniform(*_CONTENT_RANGE, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), np.float64)


def generator_images(label_row: np.ndarray, num: int, size: int,
                     rng: np.random.Generator) -> np.ndarray:
    """uint8 [num, size, size, 3] images of a generator with these labels: content + fingerprint."""
    fp = fingerprint(label_row, size)
    out = [_content(rng, size) + fp + rng.normal(0, _NOISE, (size, size, 3)) for _ in range(num)]
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


def write_dataset(out: str | Path, *, num_generators: int = 16, images_per_generator: int = 24,
                  size: int = 32, num_splits: int = 4, test_per_split: int = 2,
                  seed: int = 0) -> Path:
    """Write a labelled dataset into `out` (created) and return the path of its dataset.json.

    Args:
      num_generators: generators (label rows), named SYN_00, SYN_01, ...
      images_per_generator: PNG images per generator.
      size: image side in pixels.
      num_splits: test splits; split k tests generators [(k-1) t, k t) (disjoint, like RE-116's).
      test_per_split: t, test generators per split.
      seed: labels and image content (the label -> fingerprint map is fixed).
    """
    if num_splits * test_per_split >= num_generators:
        raise ValueError(f"{num_splits} splits of {test_per_split} test generators need more than "
                         f"{num_generators} generators (some must train)")
    out = Path(out)
    names = [f"SYN_{i:02d}" for i in range(num_generators)]
    tables = label_tables(num_generators, seed)
    matrix = targets.label_matrix(tables)
    labels_dir = out / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    for key, rel in DATASET_JSON["labels"].items():
        np.save(out / rel, tables[key])
    (out / DATASET_JSON["names"]).write_text("\n".join(names) + "\n")
    splits = {str(k + 1): names[k * test_per_split:(k + 1) * test_per_split] for k in range(num_splits)}
    (out / DATASET_JSON["splits"]).write_text(json.dumps({"test_splits": splits}, indent=1))
    rng = np.random.default_rng([seed, 1])
    for row, name in enumerate(names):
        folder = out / DATASET_JSON["images"] / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(generator_images(matrix[row], images_per_generator, size, rng)):
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    path = out / "dataset.json"
    path.write_text(json.dumps(DATASET_JSON, indent=1))
    return path
