"""Parse unlabelled images with a trained run: images or a folder -> hyperparameters, as JSON.

    from adaparse_jax.predict import predict
    results = predict("runs/re116_s1", ["a.png", "b.jpg"])        # or folder="my_images/"
    results[0]["discrete"]["normalization"]                          # {'class': 2, 'probs': [...]}

    python -m adaparse_jax.predict --workdir runs/re116_s1 --folder my_images/ --out parsed.json

Images are decoded exactly as for training (PIL RGB, bilinear antialiased resize to the model's
input size, `data.cache.decode_image`); a folder is searched recursively through
`data.cache.prepare_folder` (skipped files are reported, not fatal). The checkpoint is the run's
selected one (`checkpointing.selected_step`) unless `step` is given.

Each result is a JSON-able dict:

  image        the path (or the index of an in-memory image)
  continuous   {target: value}: the 9 counts, min-max normalised to [0, 1] as the label tables are
  discrete     {target: {"class": id, "probs": [...]}} for the 6 architecture choices
  loss_groups  {group: {"used": bool, "probs": [...]}}
  loss_flags   {flag: {"used": bool, "probs": [...]}}  (probabilities gated by the group, official)

Class ids follow the label tables' coding (RE-116 does not publish class names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import targets


def _results(preds: dict, names: Sequence) -> list[dict]:
    out = []
    for i, name in enumerate(names):
        r = {"image": name,
             "continuous": {t.name: float(v) for t, v in zip(targets.CONTINUOUS_TARGETS,
                                                            preds["continuous"][i])},
             "discrete": {}, "loss_groups": {}, "loss_flags": {}}
        for t in targets.CLASSIFICATION_TARGETS:
            probs = [float(p) for p in preds[f"prob/{t.name}"][i]]
            cls = int(preds[t.name][i])
            if t.kind == targets.DISCRETE:
                r["discrete"][t.name] = {"class": cls, "probs": probs}
            else:
                key = "loss_groups" if t.kind == targets.GROUP else "loss_flags"
                r[key][t.name] = {"used": cls == 1, "probs": probs}
        out.append(r)
    return out


def predict(workdir: str | os.PathLike, images: Sequence | None = None, *,
            folder: str | os.PathLike | None = None, step: int | None = None,
            batch_size: int = 64) -> list[dict]:
    """Predict the 25 hyperparameters of the generator of each image (see the module docstring).

    Args:
      workdir: a training run's workdir.
      images: file paths, or uint8 arrays [H, W, 3] / PIL images (decoded like files).
      folder: a folder of images instead (recursive).
      step: checkpoint step (default: the run's selected checkpoint).
      batch_size: images per forward pass.
    """
    from PIL import Image

    from adaparse_jax import runs
    from adaparse_jax.data import cache as cache_lib

    if (images is None) == (folder is None):
        raise ValueError("give either images or folder=")
    run = runs.load(workdir, step)
    size = run.spec.image_size
    if folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = cache_lib.prepare_folder(folder, Path(tmp) / "cache",
                                                settings=cache_lib.PrepareSettings(size=size),
                                                workers=1, progress=False)
            for s in manifest["skipped"]:
                print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
            cache = cache_lib.Cache(Path(tmp) / "cache")
            pixels = cache.read(np.arange(len(cache)))
            root = Path(cache.settings["source_root"])
            names = [str(root / p) for p in cache.paths]
    else:
        arrays, names = [], []
        for i, item in enumerate(images):
            if isinstance(item, (str, os.PathLike)):
                arrays.append(cache_lib.decode_image(item, size))
                names.append(str(item))
            else:
                image = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item, np.uint8))
                arrays.append(np.asarray(cache_lib.to_rgb(image).resize((size, size), Image.BILINEAR),
                                         np.uint8))
                names.append(i)
        pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    if len(pixels) == 0:
        return []
    return _results(run.parse(pixels, batch_size), names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaparse_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--folder", help="a folder of images (recursive)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the selected one)")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    results = predict(args.workdir, args.images, folder=args.folder, step=args.step)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(f"parsed {len(results)} images -> {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
