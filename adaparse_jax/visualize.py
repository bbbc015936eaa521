"""Pictures of what a run sees: fingerprints, spectra per class, and the parser's feature space.

    python -m adaparse_jax.visualize --workdir runs/tiny --split test --out pictures/
    python -m adaparse_jax.visualize --workdir runs/tiny --folder runs/tiny/dataset/images/SYN_00 --out pictures/
    python -m adaparse_jax.visualize --workdir runs/tiny a.png b.png --out pictures/

Writes PNGs into OUT:

  fingerprints.png    one image (the first, or --index) and its fingerprints with their log
                      spectra: AdaParse's 25 target-specific fingerprints (AdaParse, Fig. 1's idea),
                      RE-Net's one. Fingerprints are min-max scaled per panel for display; the
                      spectra share one colour scale (log |F| of the gray fingerprint, centred).
  class_spectra.png   for each discrete attribute, the mean log spectrum of the images of each class
                      (of that attribute's fingerprint, or of the input images with
                      --spectra-of image), on one colour scale per attribute.
  tsne.png            a t-SNE (scikit-learn) of the parser's features, the 64-d input of each
                      attribute's head, coloured by the attribute's true class. With --split test
                      (or val) these are the run's held-out generators, read from its cache.

The last two need true labels: with --split they come from the run's dataset; with image files or
a folder, from the run's dataset when the files lie in its image folders (one folder per
generator), and the pictures are skipped with the reason otherwise. Class names come from the
dataset as in `parse` (ids where it records none).

Library use: `collect(run, pixels)` gives the arrays each picture plots (per-image log spectra and
head features by attribute); `class_mean_spectra`, `tsne` and the `plot_*` functions draw them.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import targets
from adaparse_jax.parse import ParseError, Vocabulary, open_run, read_images, run_vocabulary

SPECTRA_OF = ("fingerprint", "image")
SPLITS = ("test", "val")
FIGURE_DPI = 110


class VisualizeError(ValueError):
    """Bad input to `visualize`, named in the message."""


# ------------------------------------------------------------------------------------------------
# The arrays the pictures plot.


def log_spectra(x) -> np.ndarray:
    """[N, H, W, 3] (fingerprints or normalised images) -> log of the official spectrum [N, H, W].

    The spectrum is `spectral.fingerprint_spectra`'s: magnitude of the 2-D FFT of the gray image,
    floored at 1e-2 and shifted so that frequency 0 is at the centre.
    """
    import jax.numpy as jnp

    from adaparse_jax import spectral

    return np.asarray(jnp.log(spectral.fingerprint_spectra(x)["spectrum"]))


def _outputs_and_features(model, variables, pixels):
    """uint8 [B, S, S, 3] -> (model outputs, per-fingerprint parser features [B, T, F])."""
    from adaparse_jax.data import pipeline
    from adaparse_jax.models import parsing

    out, state = model.apply(variables, pipeline.normalize(pixels), train=False,
                             mutable=[parsing.INTERMEDIATES])
    (features,) = state[parsing.INTERMEDIATES]["parser"][parsing.FEATURES]
    return out, features


@functools.cache
def _forward():
    import jax

    return jax.jit(_outputs_and_features, static_argnums=0)  # one compilation per model config


def fingerprint_index(num_fingerprints: int, target: targets.Target) -> int:
    """Which fingerprint a head reads: its own of AdaParse's 25, or RE-Net's only one."""
    return targets.head_index(target.name) if num_fingerprints == targets.NUM_HEADS else 0


def collect(run, pixels: np.ndarray, *, spectra_of: str = "fingerprint", batch_size: int = 32) -> dict:
    """Per-image arrays for the pictures, batch by batch (all fingerprints never sit in memory).

    Returns:
      'spectra' {attribute: [N, S, S]}: log spectra of each discrete attribute's fingerprint (or of
        the normalised input image, the same for every attribute, with spectra_of='image');
      'features' {attribute: [N, F]}: the input of the attribute's head
        (`models.head_features` of the parser's sown features);
      'logits' {attribute: [N, K]}: the heads' outputs on those features (checks and plots).
    """
    import jax

    from adaparse_jax import models
    from adaparse_jax.data import pipeline

    if spectra_of not in SPECTRA_OF:
        raise VisualizeError(f"spectra_of={spectra_of!r}; expected one of {SPECTRA_OF}")
    parts = []
    for i in range(0, len(pixels), batch_size):
        batch = np.asarray(pixels[i:i + batch_size])
        out, features = _forward()(run.model, run.variables, batch)
        t = out["fingerprints"].shape[1]
        if spectra_of == "image":
            image = log_spectra(pipeline.normalize(batch))
        part = {"spectra": {}, "features": {}, "logits": {}}
        for a in targets.DISCRETE_TARGETS:
            part["spectra"][a.name] = (image if spectra_of == "image" else
                                       log_spectra(out["fingerprints"][:, fingerprint_index(t, a)]))
            part["features"][a.name] = np.asarray(models.head_features(features, a))
            part["logits"][a.name] = np.asarray(out["logits"][a.name])
        parts.append(jax.device_get(part))
    return {k: {a: np.concatenate([p[k][a] for p in parts]) for a in parts[0][k]} for k in parts[0]}


def class_mean_spectra(spectra: np.ndarray, classes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the images of each class: ([K, H, W] means, NaN where a class has no image; [K] counts)."""
    classes = np.asarray(classes, np.int64)
    counts = np.bincount(classes, minlength=num_classes)[:num_classes]
    means = np.full((num_classes, *spectra.shape[1:]), np.nan)
    for k in np.flatnonzero(counts):
        means[k] = np.asarray(spectra, np.float64)[classes == k].mean(axis=0)
    return means, counts


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N, F] -> [N, 2] t-SNE embedding (scikit-learn; perplexity capped for small N)."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 3:
        raise VisualizeError(f"a t-SNE needs at least 3 images, got {n}")
    perplexity = float(min(30.0, (n - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, np.float64))


# ------------------------------------------------------------------------------------------------
# Labels of the given images, from the run's dataset.


def _run_data(config):
    """(dataset, split, cache) of a run, never generating or decoding anything."""
    from adaparse_jax import train as training

    d = config.data
    if d.generate and not (Path(d.dataset) / "dataset.json").is_file():
        raise VisualizeError(f"the run's generated dataset {d.dataset} is gone (no dataset.json)")
    try:
        run = training.setup_data(config, prepare=False)
    except (training.ConfigError, OSError) as e:
        raise VisualizeError(f"cannot read the run's data: {e}") from None
    return run.dataset, run.split, run.cache


def labels_of_paths(dataset, names: Sequence[str]) -> np.ndarray:
    """Label-table row of each image path under the dataset's image folders; -1 elsewhere."""
    root = Path(dataset.images).resolve()
    folders = {f: n for n in dataset.names for f in dataset.folder_names(n)}
    rows = []
    for name in names:
        try:
            folder = Path(name).resolve().relative_to(root).parts[0]
        except (ValueError, IndexError):
            rows.append(-1)
            continue
        rows.append(dataset.row(folders[folder]) if folder in folders else -1)
    return np.asarray(rows, np.int64)


def split_pixels(dataset, split, cache, which: str, per_generator: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Up to `per_generator` cached images of each generator of a run's `which` split.

    Returns (uint8 [N, S, S, 3], label-table rows [N], generator names).
    """
    if which not in SPLITS:
        raise VisualizeError(f"--split {which!r}; expected one of {SPLITS}")
    gens = list(getattr(split, which))
    if not gens:
        raise VisualizeError(f"the run has no {which} generators (config.data.num_val = 0?)")
    records = np.concatenate([cache.records([g])[:per_generator] for g in gens])
    rows = np.asarray([dataset.row(cache.names[i]) for i in cache.generator[records]], np.int64)
    return cache.read(records), rows, gens


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no pyplot state, no display needed).


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _freq_extent(h: int, w: int) -> list[float]:
    # Shifted spectrum: frequency 0 at row h // 2, column w // 2 (cycles per image).
    return [-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5]


def _display(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def plot_fingerprints(image: np.ndarray, fingerprints: np.ndarray, spectra: np.ndarray, title: str, path) -> None:
    """The input image, its T fingerprints [T, S, S, 3] and their log spectra [T, S, S], one grid."""
    t = len(fingerprints)
    names = [h.title for h in targets.HEADS] if t == targets.NUM_HEADS else ["all targets"]
    cols = 5 if t > 1 else 1
    rows = -(-t // cols)
    fig = _figure(figsize=(3.0 + 2 * 1.9 * cols, 1.9 * rows + 1.0), layout="constrained")
    left, mid, right = fig.subfigures(1, 3, width_ratios=[2.0, 1.9 * cols, 1.9 * cols])
    ax = left.subplots()
    ax.imshow(image)
    ax.set_title("input", fontsize=9)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    vmin, vmax = float(spectra.min()), float(spectra.max())
    h, w = spectra.shape[1:]
    for sub, what in ((mid, "fingerprint"), (right, "spectrum")):
        axes = np.atleast_1d(sub.subplots(rows, cols, squeeze=False)).reshape(-1)
        im = None
        for i, a in enumerate(axes):
            if i >= t:
                a.axis("off")
                continue
            if what == "fingerprint":
                a.imshow(_display(fingerprints[i]))
            else:
                im = a.imshow(spectra[i], vmin=vmin, vmax=vmax, cmap="magma", extent=_freq_extent(h, w))
            a.set_title(names[i], fontsize=7)
            if i != (rows - 1) * cols:  # only the bottom-left panel carries ticks and axis labels
                a.set_xticks([])  # (50 panels of ticks took most of the figure's drawing time)
                a.set_yticks([])
                continue
            a.tick_params(labelsize=5)
            a.set_xlabel("x (px)" if what == "fingerprint" else "u (cycles/image)", fontsize=7)
            a.set_ylabel("y (px)" if what == "fingerprint" else "v (cycles/image)", fontsize=7)
        sub.suptitle("fingerprints (min-max scaled per panel)" if what == "fingerprint"
                     else "log spectra of the gray fingerprints (one scale)", fontsize=9)
        if im is not None:
            sub.colorbar(im, ax=axes[:t].tolist(), shrink=0.6, label="log |F|")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=FIGURE_DPI)


def plot_class_spectra(means: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray],
                       vocab: Vocabulary, title: str, path) -> None:
    """Rows: discrete attributes; columns: their classes' mean log spectra [K, H, W]."""
    attrs = [a for a in targets.DISCRETE_TARGETS if a.name in means]
    cols = max(a.num_classes for a in attrs)
    fig = _figure(figsize=(2.3 * cols + 1.2, 2.2 * len(attrs) + 0.6), layout="constrained")
    axes = fig.subplots(len(attrs), cols, squeeze=False)
    for row, a in zip(axes, attrs):
        m = means[a.name]
        finite = m[np.isfinite(m)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        im = None
        for k, ax in enumerate(row):
            if k >= a.num_classes:
                ax.axis("off")
                continue
            name = vocab.class_names[a.name][k]
            if counts[a.name][k]:
                im = ax.imshow(m[k], vmin=vmin, vmax=vmax, cmap="magma",
                               extent=_freq_extent(*m.shape[1:]))
            ax.set_title(f"{a.title}: {name} (n={int(counts[a.name][k])})", fontsize=7)
            if not counts[a.name][k]:
                ax.text(0.5, 0.5, "no image of this class", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.set_xlabel("u (cycles/image)", fontsize=6)
            ax.set_ylabel("v (cycles/image)", fontsize=6)
            ax.tick_params(labelsize=5)
        if im is not None:
            fig.colorbar(im, ax=row.tolist(), shrink=0.8, label="mean log |F|")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=FIGURE_DPI)


def plot_tsne(embeddings: Mapping[str, np.ndarray], classes: Mapping[str, np.ndarray],
              vocab: Vocabulary, title: str, path) -> None:
    """One scatter per discrete attribute: embedding [N, 2] coloured by true class."""
    attrs = [a for a in targets.DISCRETE_TARGETS if a.name in embeddings]
    cols = 3
    rows = -(-len(attrs) // cols)
    fig = _figure(figsize=(4.2 * cols, 3.8 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[len(attrs):]:
        ax.axis("off")
    for ax, a in zip(axes, attrs):
        e, c = embeddings[a.name], classes[a.name]
        for k, name in enumerate(vocab.class_names[a.name]):
            sel = c == k
            if sel.any():
                ax.scatter(e[sel, 0], e[sel, 1], s=9, alpha=0.8, color=f"C{k}",  # one colour per class id
                           label=f"{name} ({int(sel.sum())})")
        ax.set_title(a.title, fontsize=9)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(fontsize=6, title="true class", title_fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=FIGURE_DPI)


# ------------------------------------------------------------------------------------------------
# The command.


def _pick_images(run, images, folder, split, per_generator: int, result: dict) -> tuple:
    """(pixels, names, rows, dataset, where) of the images to show: `split`'s images from the run's
    cache, or the given images / folder. rows: their label rows in the run's dataset (-1: unknown);
    where: the images in words. Skipped files and notes go into `result`."""
    dataset = None
    if split is not None:
        dataset, run_split, cache = _run_data(run.config)
        pixels, rows, gens = split_pixels(dataset, run_split, cache, split, per_generator)
        names = [f"{split} image {i}" for i in range(len(pixels))]
        where = f"{len(pixels)} images of the run's {len(gens)} {split} generators"
    else:
        pixels, names, skipped = read_images(images, folder, run.spec.image_size)
        result["skipped"] = skipped
        try:
            dataset, _, _ = _run_data(run.config)
            rows = labels_of_paths(dataset, names)
        except VisualizeError as e:
            rows = np.full(len(pixels), -1)
            result["notes"].append(str(e))
        gens = sorted({int(r) for r in rows if r >= 0})
        where = f"{int((rows >= 0).sum())} labelled images of {len(gens)} generators"
    return pixels, names, rows, dataset, where


def visualize(workdir, images: Sequence | None = None, *, folder=None, split: str | None = None,
              out, step: int | None = None, index: int = 0, spectra_of: str = "fingerprint",
              per_generator: int = 32, seed: int = 0, allow_untrained: bool = False,
              log=print) -> dict:
    """Write the pictures (see the module docstring) into `out`; returns {kind: path} and notes.

    Give image files / arrays, a `folder`, or `split` ('test' | 'val': the run's held-out generators
    from its cache, `per_generator` images each).
    """
    if sum(x is not None for x in (images, folder, split)) != 1:
        raise VisualizeError("give images, a folder or a split (exactly one)")
    run, warning = open_run(workdir, step, allow_untrained=allow_untrained)
    vocab = run_vocabulary(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"files": {}, "notes": [warning] if warning else []}
    pixels, names, rows, dataset, where = _pick_images(run, images, folder, split, per_generator,
                                                       result)
    if not 0 <= index < len(pixels):
        raise VisualizeError(f"--index {index}: there are {len(pixels)} images (0..{len(pixels) - 1})")

    # (a) one image's fingerprints and their spectra.
    import jax

    out_a, _ = jax.device_get(_forward()(run.model, run.variables, pixels[index:index + 1]))
    fps = np.asarray(out_a["fingerprints"][0], np.float32)
    path = out / "fingerprints.png"
    plot_fingerprints(pixels[index], fps, log_spectra(fps),
                      f"{run.config.model.arch}: fingerprints of {Path(str(names[index])).name} "
                      f"(checkpoint step {run.step})", path)
    result["files"]["fingerprints"] = str(path)

    # (b), (c): labelled images only.
    labelled = np.flatnonzero(rows >= 0)
    if len(labelled) < 3:
        result["notes"].append(
            f"class spectra and t-SNE skipped: {len(labelled)} of {len(pixels)} images have labels "
            "(they must lie in the run's dataset folders, at least 3; or use --split test)")
    else:
        data = collect(run, pixels[labelled], spectra_of=spectra_of)
        classes = {a.name: dataset.labels[rows[labelled], targets.column_index(a.name)].astype(np.int64)
                   for a in targets.DISCRETE_TARGETS}
        means, counts = {}, {}
        for a in targets.DISCRETE_TARGETS:
            means[a.name], counts[a.name] = class_mean_spectra(data["spectra"][a.name],
                                                               classes[a.name], a.num_classes)
        path = out / "class_spectra.png"
        what = "each attribute's fingerprint" if spectra_of == "fingerprint" else "the input images"
        plot_class_spectra(means, counts, vocab, f"mean log spectrum of {what} per true class: {where}",
                           path)
        result["files"]["class_spectra"] = str(path)
        embeddings = {}
        for a in targets.DISCRETE_TARGETS:
            # RE-Net's heads all read the one fingerprint's features: one embedding serves all.
            same = next((b for b in embeddings
                         if np.array_equal(data["features"][b], data["features"][a.name])), None)
            embeddings[a.name] = embeddings[same] if same else tsne(data["features"][a.name], seed)
        path = out / "tsne.png"
        plot_tsne(embeddings, classes, vocab,
                  f"t-SNE of the parser's features (each attribute's head input): {where}", path)
        result["files"]["tsne"] = str(path)
        result["arrays"] = {"rows": rows[labelled], "classes": classes, "means": means,
                            "counts": counts, "embeddings": embeddings, **data}
    for n in result["notes"]:
        log(n)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaparse_jax.visualize",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--folder", help="a folder of images (recursive)")
    p.add_argument("--split", choices=SPLITS, help="the run's held-out generators, from its cache")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the selected one)")
    p.add_argument("--index", type=int, default=0, help="which image's fingerprints to draw")
    p.add_argument("--spectra-of", choices=SPECTRA_OF, default="fingerprint",
                   help="class spectra of each attribute's fingerprint (default) or of the images")
    p.add_argument("--per-generator", type=int, default=32, help="images per generator with --split")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed")
    p.add_argument("--allow-untrained", "--allow_untrained", action="store_true",
                   help="use a checkpoint that records untrained parts")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.images, args.folder, args.split)) != 1:
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: give image files, --folder DIR or --split test|val (one of them)",
              file=sys.stderr)
        return 2
    from adaparse_jax import checkpointing

    try:
        result = visualize(args.workdir, args.images or None, folder=args.folder, split=args.split,
                           out=args.out, step=args.step, index=args.index, spectra_of=args.spectra_of,
                           per_generator=args.per_generator, seed=args.seed,
                           allow_untrained=args.allow_untrained,
                           log=lambda m: print(m, file=sys.stderr))
    except (VisualizeError, ParseError, FileNotFoundError, checkpointing.CheckpointMismatchError,
            checkpointing.UntrainedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in result.get("skipped", []):
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    for kind, path in result["files"].items():
        print(f"wrote {path} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
