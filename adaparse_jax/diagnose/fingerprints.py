"""The spectral probe of k-fold runs' fingerprints on held-out generators, beside the images'.

  python -m adaparse_jax.diagnose --zoo runs/demo/zoo --runs 'runs/demo/runs/renet_improved_fold*'

The zoo's spectral probe (`zoo.probe.probe`: a logistic regression per fold, fitted on the fold's
training generators, each held-out generator decided and the folds pooled) run twice on the same
folds: on the images' features, and on the features of the fingerprints that each fold's run (the
one that held that fold out, so no fingerprint comes from a network that trained on its generator)
makes of every image: RE-Net's one fingerprint, AdaParse's fingerprint of the attribute's head.
Where the images carry an attribute and the fingerprints do not, the run's FEN lost it; where
both carry it, a parser that reads it worse loses it itself. Unlike the sample probe of a single
run (`diagnose --workdir`, section 4), the probe sees every image of every generator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaparse_jax import evaluation, stats, targets
from adaparse_jax import runs as runs_lib
from adaparse_jax.data import load_dataset
from adaparse_jax.zoo import probe as zoo_probe

MARKDOWN = "fingerprints.md"
JSON = "fingerprints.json"


def runs_by_fold(runs: Sequence[str | os.PathLike]) -> dict[str, runs_lib.Run]:
    """{fold: restored run}: the split each run's saved config names; one run per fold."""
    out: dict[str, runs_lib.Run] = {}
    for workdir in evaluation.expand_workdirs(runs):
        run = runs_lib.load(workdir)
        fold = str(run.config.split)
        if fold in out:
            raise ValueError(f"runs {out[fold].workdir} and {run.workdir} both hold out fold {fold}; "
                             "give one run per fold")
        out[fold] = run
    return out


def run_features(runs: Mapping[str, runs_lib.Run], root: str | os.PathLike, names: Sequence[str],
                 attributes: Sequence[str], channels: str = "mean",
                 batch_size: int = 100) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{attribute: {fold: {generator: [N, F]}}}: `zoo.probe.spectral_features` of the fingerprints
    that each fold's run makes of every generator's images (RE-Net's one fingerprint, AdaParse's
    fingerprint of the attribute's head, `targets.head_index`)."""
    apply = {fold: jax.jit(run.apply) for fold, run in runs.items()}
    out: dict = {a: {f: {} for f in runs} for a in attributes}
    for name in names:
        images = zoo_probe.load_images(root, name)
        for fold, run in runs.items():
            if images.shape[1] != run.spec.image_size:
                raise ValueError(f"run {run.workdir} reads {run.spec.image_size} px images; zoo {root} "
                                 f"holds {images.shape[1]} px")
            fps = np.concatenate([
                np.asarray(apply[fold](run.variables, jnp.asarray(images[i:i + batch_size]))["fingerprints"],
                           np.float32) for i in range(0, len(images), batch_size)])
            for a in attributes:
                head = targets.head_index(a) if fps.shape[1] > 1 else 0
                out[a][fold][name] = zoo_probe.spectral_features(fps[:, head], channels)
    return out


def held_out_fingerprints(root: str | os.PathLike, runs: Sequence[str | os.PathLike],
                          attributes: Sequence[str] | None = None, *, channels: str = "mean",
                          decide: str = "mean", n_resamples: int = stats.N_RESAMPLES,
                          seed: int = 0) -> dict:
    """{'zoo', 'runs': {fold: workdir}, 'channels', 'decide', 'images': probe results,
    'fingerprints': probe results} (`zoo.probe.probe`'s, per attribute, default the six discrete
    ones), on the same folds, decisions and permutations."""
    root = os.fspath(root)
    by_fold = runs_by_fold(runs)
    dataset = load_dataset(root)
    folds = dataset.test_splits
    missing = sorted(set(folds) - set(by_fold))
    extra = sorted(set(by_fold) - set(folds))
    if missing or extra:
        raise ValueError(f"zoo {root} has folds {sorted(folds)}; no run holds out fold(s) {missing}"
                         + (f", and runs hold out unknown fold(s) {extra}" if extra else "")
                         + "; give one run per fold")
    attributes = list(attributes or [t.name for t in targets.DISCRETE_TARGETS])
    common = dict(n_resamples=n_resamples, seed=seed, channels=channels, decide=decide)
    images = zoo_probe.probe(root, attributes, **common)
    fingerprints = zoo_probe.probe(root, attributes, **common,
                                   features=run_features(by_fold, root, dataset.names, attributes, channels))
    return {"zoo": root, "runs": {f: str(r.workdir) for f, r in sorted(by_fold.items())},
            "channels": channels, "decide": decide, "images": images, "fingerprints": fingerprints}


def markdown(result: Mapping) -> str:
    rule = "mean probability" if result["decide"] == "mean" else "majority vote of the images' argmaxes"
    rows = ["# Spectral probe on held-out generators: images vs the runs' fingerprints", "",
            f"Zoo {result['zoo']}, features of the {result['channels']} channel(s), a held-out "
            f"generator decided by the {rule}; fingerprints of fold f by the run holding f out:",
            *[f"- fold {f}: {w}" for f, w in result["runs"].items()], "",
            "| attribute | images: F1 (p) | fingerprints: F1 (p) | images: per image F1 "
            "| fingerprints: per image F1 | generators |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, img in result["images"].items():
        fp = result["fingerprints"][name]
        rows.append(f"| {img['title']} | {img['f1']:.3f} (p={img['p']:.4f}) | {fp['f1']:.3f} "
                    f"(p={fp['p']:.4f}) | {img['f1_image']:.3f} | {fp['f1_image']:.3f} | {img['generators']} |")
    return "\n".join(rows) + "\n"
