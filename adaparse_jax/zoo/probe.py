"""A held-out spectral probe: which discrete attributes a zoo's images carry, without a CNN.

  python -m adaparse_jax.zoo probe --zoo runs/zoo_demo            # every discrete attribute
  python -m adaparse_jax.zoo probe --zoo runs/bench/zoo --attributes upsampling,skip
  python -m adaparse_jax.zoo probe --zoo ZOO --attributes loss_group1,loss_group2,loss_group3 --channels rgb

A reference for the parsing networks, not a competitor: features a linear model can read
(`spectral_features`: the log amplitude spectrum of the gray high-pass residual and its mean per
pixel position modulo 2 and 4, where up-sampling leaves periodic traces), a logistic regression
fitted on the images of each fold's training generators, and each held-out generator decided once
by its mean probability. The held-out decisions of all folds are pooled and scored like the
parsing networks' (`adaparse_jax.stats.permutation_test`: generator-level macro F1 and its
generator-permutation p-value), so an attribute this probe reads at p < 0.01 is one the zoo makes
learnable from single images. The coarse loss groups can be probed too (`--attributes
loss_group1,...`), and `channels='rgb'` reads each colour channel's features instead of the gray
(channel-mean) image's, as the parser's `parser_spectrum_channels` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from adaparse_jax import spectral, stats, targets

C = 0.05  # inverse L2 strength of the logistic regression (scikit-learn's C)


def load_images(root: str | os.PathLike, name: str) -> np.ndarray:
    """[N, H, W, 3] uint8: the PNG images of generator `name` in a zoo directory, by file name."""
    paths = sorted((Path(root) / "images" / name).glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"zoo {root}: no PNG images for generator {name}")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


CHANNELS = spectral.CHANNELS


def spectral_features(images: np.ndarray, channels: str = "mean") -> np.ndarray:
    """[N, S, S, 3] (S divisible by 4) -> [N, F] float32: `spectral.residual_features` of the
    channel-mean gray image (the log amplitude spectrum of its high-pass residual and the mean
    absolute residual at each position modulo 2 and 4, where up-sampling leaves periodic traces);
    channels='rgb': those of each colour channel, concatenated ([N, 3F]); `spectral.channel_features`.

    uint8 images are read as pixels / 255; float arrays (e.g. fingerprints) as they are."""
    size = images.shape[1] if images.ndim > 1 else 0
    if images.ndim != 4 or images.shape[2] != size or images.shape[3] != 3 or size % 4:
        raise ValueError(f"expected [N, S, S, 3] images with S divisible by 4, got {images.shape}")
    pixels = images.astype(np.float32)
    if images.dtype == np.uint8:
        pixels /= 255.0
    return spectral.channel_features(pixels, channels, xp=np)


def held_out_decisions(features: dict[str, np.ndarray], labels: dict[str, int],
                       folds: dict[str, Sequence[str]]) -> tuple[list[int], list[int]]:
    """(truth, decided) over every fold's held-out generators: a logistic regression fitted on the
    images of the fold's other generators decides each held-out generator by its mean probability."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth, decided = [], []
    for fold in folds.values():
        held = set(fold)
        train = [n for n in features if n not in held]
        x = np.concatenate([features[n] for n in train])
        y = np.concatenate([np.full(len(features[n]), labels[n]) for n in train])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(x, y)
        for n in fold:
            truth.append(labels[n])
            decided.append(int(clf.classes_[clf.predict_proba(features[n]).mean(0).argmax()]))
    return truth, decided


def probe(root: str | os.PathLike, attributes: Sequence[str] | None = None, *,
          n_resamples: int = stats.N_RESAMPLES, seed: int = 0, channels: str = "mean") -> dict[str, dict]:
    """Per attribute (default: the six discrete ones; the coarse loss groups on request):
    held-out generator-level macro F1, its permutation p-value and the null mean (the F1 these
    decisions get by chance), pooled over the zoo's folds. channels: `spectral_features`'."""
    from adaparse_jax.data import load_dataset

    ds = load_dataset(root)
    discrete = [t.name for t in targets.DISCRETE_TARGETS]
    known = discrete + [t.name for t in targets.GROUPS]
    attributes = list(attributes or discrete)
    unknown = sorted(set(attributes) - set(known))
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; the attributes are {known}")
    features = {n: spectral_features(load_images(root, n), channels) for n in ds.names}
    out = {}
    for name in attributes:
        target = targets.BY_NAME[name]
        column = ds.labels[:, targets.column_index(name)].astype(np.int64)
        truth, decided = held_out_decisions(features, dict(zip(ds.names, column)), ds.test_splits)
        k = target.num_classes
        result = stats.permutation_test(truth, np.eye(k)[decided], k, n_resamples=n_resamples,
                                          seed=seed)
        out[name] = dict(title=target.title, f1=result.statistic, p=result.pvalue,
                         chance=result.null_mean, generators=len(truth))
    return out


def markdown(results: dict[str, dict]) -> str:
    rows = ["| attribute | held-out macro F1 | p | chance (null mean) | generators |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {r['title']} | {r['f1']:.3f} | {r['p']:.4f} | {r['chance']:.3f} | {r['generators']} |"
             for r in results.values()]
    return "\n".join(rows)
