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

Two readings beside a network's k-fold runs on the same zoo, to tell where it loses what
the probe reads: `--decide vote` decides each held-out generator by the majority vote of its
images' argmaxes (the parsing networks' rule) instead of the mean probability, and the per-image
F1 column needs no generator decision at all. The same probe of a run's fingerprints instead of
the images: `python -m adaparse_jax.diagnose --zoo ZOO --runs 'RUNS/renet_improved_fold*'`
(`diagnose.fingerprints`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from adaparse_jax import metrics, spectral, stats, targets

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


DECISIONS = ("mean", "vote")


@dataclasses.dataclass(frozen=True)
class HeldOutProbe:
    """The probe's held-out predictions, pooled over the folds, one entry per held-out generator
    (fold order): its true class, its decision by the mean probability of its images ('mean', the
    probe's rule) and by the majority vote of their argmaxes ('vote', the parsing networks' rule,
    `metrics.majority_vote`), and each image's argmax."""

    truth: list[int]
    mean: list[int]
    vote: list[int]
    images: list[np.ndarray]


def held_out_predictions(features: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, int],
                         folds: Mapping[str, Sequence[str]], num_classes: int) -> HeldOutProbe:
    """For every fold, a logistic regression fitted on the images of the fold's other generators
    predicts the images of its held-out generators.

    features: per fold, {generator: [N, F]} (the same mapping for every fold when the features do
    not depend on the fold; a run's fingerprints do: `diagnose.fingerprints.run_features`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = HeldOutProbe([], [], [], [])
    for fold_name, fold in folds.items():
        feats = features[fold_name]
        held = set(fold)
        train = [n for n in feats if n not in held]
        x = np.concatenate([feats[n] for n in train])
        y = np.concatenate([np.full(len(feats[n]), labels[n]) for n in train])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(x, y)
        classes = clf[-1].classes_
        for n in fold:
            prob = clf.predict_proba(feats[n])
            per_image = classes[prob.argmax(1)].astype(np.int64)
            out.truth.append(int(labels[n]))
            out.mean.append(int(classes[prob.mean(0).argmax()]))
            out.vote.append(metrics.majority_vote(per_image, num_classes))
            out.images.append(per_image)
    return out


def held_out_decisions(features: dict[str, np.ndarray], labels: dict[str, int],
                       folds: dict[str, Sequence[str]]) -> tuple[list[int], list[int]]:
    """(truth, decided) over every fold's held-out generators: a logistic regression fitted on the
    images of the fold's other generators decides each held-out generator by its mean probability."""
    num_classes = int(max(labels.values())) + 1
    held = held_out_predictions({f: features for f in folds}, labels, folds, num_classes)
    return held.truth, held.mean


def probe(root: str | os.PathLike, attributes: Sequence[str] | None = None, *,
          n_resamples: int = stats.N_RESAMPLES, seed: int = 0, channels: str = "mean",
          decide: str = "mean", features: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] | None = None
          ) -> dict[str, dict]:
    """Per attribute (default: the six discrete ones; the coarse loss groups on request):
    held-out generator-level macro F1, its permutation p-value and the null mean (the F1 these
    decisions get by chance), pooled over the zoo's folds, and the held-out macro F1 over images
    ('f1_image', each image decided alone). channels: `spectral_features`'.

    decide: 'mean' (the probe's rule: a generator's class is the argmax of its images' mean
    probability) or 'vote' (the parsing networks' rule: the majority vote of its images' argmaxes).
    features: {attribute: {fold: {generator: [N, F]}}} to probe instead of the images' (e.g.
    `diagnose.fingerprints.run_features`: each fold's run's fingerprints of the images)."""
    from sklearn.metrics import f1_score

    from adaparse_jax.data import load_dataset

    if decide not in DECISIONS:
        raise ValueError(f"decide={decide!r}; expected one of {DECISIONS}")
    ds = load_dataset(root)
    discrete = [t.name for t in targets.DISCRETE_TARGETS]
    known = discrete + [t.name for t in targets.GROUPS]
    attributes = list(attributes or discrete)
    unknown = sorted(set(attributes) - set(known))
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; the attributes are {known}")
    if features is None:
        images = {n: spectral_features(load_images(root, n), channels) for n in ds.names}
        features = {a: {f: images for f in ds.test_splits} for a in attributes}
    out = {}
    for name in attributes:
        target = targets.BY_NAME[name]
        column = ds.labels[:, targets.column_index(name)].astype(np.int64)
        k = target.num_classes
        held = held_out_predictions(features[name], dict(zip(ds.names, column)), ds.test_splits, k)
        decided = held.mean if decide == "mean" else held.vote
        result = stats.permutation_test(held.truth, np.eye(k)[decided], k, n_resamples=n_resamples,
                                          seed=seed)
        image_truth = np.concatenate([np.full(len(i), t) for t, i in zip(held.truth, held.images)])
        f1_image = f1_score(image_truth, np.concatenate(held.images), average="macro", zero_division=0)
        out[name] = dict(title=target.title, f1=result.statistic, p=result.pvalue,
                         chance=result.null_mean, generators=len(held.truth), f1_image=float(f1_image))
    return out


def markdown(results: dict[str, dict]) -> str:
    rows = ["| attribute | held-out macro F1 | p | chance (null mean) | generators | per image F1 |",
            "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['title']} | {r['f1']:.3f} | {r['p']:.4f} | {r['chance']:.3f} | {r['generators']} | "
             f"{r['f1_image']:.3f} |" for r in results.values()]
    return "\n".join(rows)
