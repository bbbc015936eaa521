"""Parse images with a trained run: what made them, per image and for the whole set, in words.

    python -m adaparse_jax.parse --workdir runs/re116_s1 --folder suspicious/ --out parsed.json
    python -m adaparse_jax.parse --workdir runs/re116_s1 a.png b.jpg --format md
    python -m adaparse_jax.parse --workdir RUN_SEED0 --workdir RUN_SEED1 --folder x/   # an ensemble

    from adaparse_jax import parse
    report = parse.parse("runs/re116_s1", folder="suspicious/")    # or parse.parse(W, ["a.png", array])
    report["set"]["discrete"]["upsampling"]["vote"]                   # e.g. 'transposed_conv'
    report["images"][0]["loss_flags"]["wgan"]["p_used"]               # e.g. 0.81

Images are decoded as for training (PIL RGB, bilinear antialiased resize to the model's input size;
`data.cache.decode_image`). In-memory images must be uint8 [H, W, 3] arrays (any H, W; resized the
same way) or PIL images: a float array, a [3, H, W] array or any other dtype or shape is refused
with the reason, never cast. A folder is searched recursively. Unreadable files (corrupt, empty,
not an image) are skipped and listed under "skipped" with the reason. The checkpoint is the run's
selected one (best by validation, else the last) unless `step` is given.

The report (`parse(...)`, JSON-able; `--format md` renders it as Markdown tables):

  images     one entry per readable image, in input order (a folder: sorted paths):
    continuous  {target: {"normalised": x in [0, 1], "value": count}}: the 9 counts, min-max
                normalised as the label tables are; "value" in real units where the run's dataset
                records the ranges (the synthetic zoo's manifest does; RE-116 does not publish them)
    discrete    {target: {"class": name, "class_id": k, "probs": {name: p}, "raw": {name: s}}}
    loss_groups, loss_flags  the same, plus "used" (the decision) and "p_used" (probs["used"])
  set        the whole set (what RE-Net's multi-image result is about): the mean of the normalised
             probabilities and of the counts, and the majority vote of the per-image decisions
             ("vote", ties to the lower class id, with the "votes" per class)
  skipped    [{"path", "reason"}]
  plus the run, checkpoint step, and where the class names came from ("class_names").

An ensemble (several --workdir, e.g. one fold trained with several seeds): per image the mean of
the members' official outputs, then the same report; "workdir", "step" and "arch" are lists, one
entry per member, and "ensemble_of" counts them. The members must read the same image size and
their datasets name the same classes and count ranges.

Probabilities: the official model gives every class its own sigmoid, so its outputs do not sum to
one (a flag may read "used" at 0.06 against 0.01). "probs" divides them by their sum, per target;
"raw" keeps the official outputs. A flag's official outputs are multiplied by its group's
probability of "used"; the factor is the same for both classes, so it cancels in "probs" (read the
group's own probability under loss_groups). The decision is the official one, the argmax, which
normalising does not change.

Class names: a synthetic zoo's manifest names its classes (`zoo.schema.CLASS_NAMES`). RE-116 does
not publish the coding of its 6 discrete attributes (its label rows do not follow one evident
convention), so they are given as ids ("class 0", ...), and the report says so; the same for any
dataset that records no names. Flags and groups are "not used" / "used" everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import targets

FLAG_CLASSES = ("not used", "used")  # class 1 of a flag or group is "used" (losses, official gating)
FORMATS = ("json", "md")
_FAMILIES = ((targets.DISCRETE, targets.DISCRETE_TARGETS), ("loss_groups", targets.GROUPS),
             ("loss_flags", targets.FLAG_TARGETS))


class ParseError(ValueError):
    """Bad input to `parse`: a missing run, an unreadable or wrongly shaped image, nothing to parse."""


# ------------------------------------------------------------------------------------------------
# The run: restored once, variables only.


def open_run(workdir: str | os.PathLike, step: int | None = None, *, allow_untrained: bool = False):
    """`adaparse_jax.load(workdir, step)`, refusing a checkpoint that records untrained parts
    (`checkpointing.UntrainedModelError`; a converted RE-Net FEN) unless `allow_untrained`.

    Returns (run, warning): warning says what is untrained when allowed, else ''.
    """
    import adaparse_jax
    from adaparse_jax import checkpointing

    run = adaparse_jax.load(workdir, step)
    return run, checkpointing.check_trained(run.workdir, run.step, allow_untrained)


@functools.cache
def _jitted_apply():
    import jax

    from adaparse_jax import train as training

    # The model is a static argument (flax modules hash by their fields): one compilation per model
    # config and batch shape in a process, however often a run is loaded (`run.apply` is this
    # function with the model bound).
    return jax.jit(training.apply_model, static_argnums=0)


def predict_pixels(run, pixels: np.ndarray, batch_size: int = 64) -> dict:
    """uint8 [N, S, S, 3] -> {'continuous': [N, 9], 'probs': {name: [N, K]}} (official outputs), NumPy.

    A short last batch is padded so the forward compiles for one shape (BatchNorm uses its running
    statistics, so padding rows change nothing).
    """
    import jax

    outs = []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i:i + batch_size]
        pad = batch_size - len(chunk) if len(pixels) > batch_size else 0
        x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)]) if pad else chunk
        out = _jitted_apply()(run.model, run.variables, x)
        outs.append(jax.device_get({"continuous": out["continuous"], "probs": out["probs"]}))
    n = len(pixels)
    return {"continuous": np.concatenate([o["continuous"] for o in outs])[:n],
            "probs": {k: np.concatenate([o["probs"][k] for o in outs])[:n] for k in outs[0]["probs"]}}


# ------------------------------------------------------------------------------------------------
# Class names and count ranges of a run's dataset.


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Words for a run's outputs.

    Attributes:
      class_names: every classification target -> its class names by id.
      source: where the names come from, or why they are ids.
      count_ranges: the dataset's count normalisation {'min': {name: v}, 'max': {...}, 'log10':
        [names]} (the zoo's manifest `count_normalisation`), or None where it records none.
    """

    class_names: Mapping[str, tuple[str, ...]]
    source: str
    count_ranges: Mapping | None = None

    def count_value(self, name: str, normalised: float) -> float | None:
        """A normalised count in real units (None without ranges): the inverse min-max map."""
        if self.count_ranges is None:
            return None
        lo, hi = self.count_ranges["min"][name], self.count_ranges["max"][name]
        value = lo + float(normalised) * (hi - lo)
        return float(10.0 ** value) if name in self.count_ranges.get("log10", ()) else float(value)


def _ids(t: targets.Target) -> tuple[str, ...]:
    return FLAG_CLASSES if t.kind in (targets.FLAG, targets.GROUP) else tuple(
        f"class {k}" for k in range(t.num_classes))


def id_vocabulary(source: str) -> Vocabulary:
    """Ids for the discrete attributes, 'not used' / 'used' for flags and groups."""
    return Vocabulary({t.name: _ids(t) for t in targets.CLASSIFICATION_TARGETS}, source)


def run_vocabulary(run) -> Vocabulary:
    """The class names (`run.spec.class_names`) and count ranges the run's dataset records."""
    names = dict(id_vocabulary("").class_names)
    for name, given in run.spec.class_names.items():
        if len(given) != targets.BY_NAME[name].num_classes:
            raise ParseError(f"the run's dataset names {len(given)} classes for {name!r}; the target "
                             f"has {targets.BY_NAME[name].num_classes}")
        names[name] = tuple(given)
    dataset = run.config.data.dataset
    root = Path(dataset).parent if Path(dataset).suffix == ".json" else Path(dataset)
    if run.spec.class_names:
        manifest = json.loads((root / "manifest.json").read_text())
        return Vocabulary(names, f"the dataset's manifest ({root / 'manifest.json'})",
                          manifest.get("count_normalisation"))
    if dataset:
        return id_vocabulary(f"dataset {root} records no class names: discrete classes are ids, "
                             "counts normalised only")
    return id_vocabulary("RE-116 does not publish the coding of its discrete classes: they are ids; "
                         "its count ranges are not published either (counts normalised only)")


# ------------------------------------------------------------------------------------------------
# Reading images.


def check_pixels(array, what: str) -> np.ndarray:
    """Return `array` as a uint8 [H, W, 3] NumPy array, or raise ParseError saying what is wrong."""
    x = np.asarray(array)
    if x.dtype != np.uint8:
        hint = (" (a float image in [0, 1]: (x * 255).round().astype(np.uint8))"
                if np.issubdtype(x.dtype, np.floating) else "")
        raise ParseError(f"{what} has dtype {x.dtype}; expected uint8 pixels 0-255, nothing is cast{hint}")
    if x.ndim != 3 or x.shape[-1] != 3:
        hint = " (channels first: x.transpose(1, 2, 0))" if x.ndim == 3 and x.shape[0] == 3 else ""
        raise ParseError(f"{what} has shape {tuple(x.shape)}; expected [H, W, 3] (RGB, channels last){hint}")
    return x


def _read_files(paths: Sequence, size: int) -> tuple[list, list, list]:
    from adaparse_jax.data import cache as cache_lib

    pixels, names, skipped = [], [], []
    for p in paths:
        path = Path(p)
        if not path.exists():
            skipped.append({"path": str(p), "reason": "does not exist"})
        elif path.is_dir():
            skipped.append({"path": str(p), "reason": "is a directory (use --folder)"})
        else:
            try:
                pixels.append(cache_lib.decode_image(path, size))
                names.append(str(p))
            except Exception as e:  # noqa: BLE001 - any decoder failure only skips this file
                skipped.append({"path": str(p), "reason": f"cannot decode: {type(e).__name__}: {e}"})
    return pixels, names, skipped


def _read_folder(folder, size: int) -> tuple[list, list, list]:
    from adaparse_jax.data import cache as cache_lib
    from adaparse_jax.data import re116

    folder = Path(folder).expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = cache_lib.prepare_folder(folder, Path(tmp) / "cache", workers=1, progress=False,
                                                settings=cache_lib.PrepareSettings(size=size))
        except re116.DatasetError as e:
            raise ParseError(str(e)) from None
        root = Path(manifest["settings"]["source_root"])
        skipped = [{"path": str(root / s["path"]), "reason": s["reason"]} for s in manifest["skipped"]]
        if not manifest["totals"]["images"]:
            return [], [], skipped
        cache = cache_lib.Cache(Path(tmp) / "cache")
        pixels = list(cache.read(np.arange(len(cache))))
        names = [str(root / p) for p in cache.paths]
    return pixels, names, skipped


def read_images(images: Sequence | None, folder, size: int) -> tuple[np.ndarray, list, list]:
    """(uint8 [N, size, size, 3], names, skipped) from files / arrays / PIL images, or a folder."""
    from PIL import Image

    from adaparse_jax.data import cache as cache_lib

    if (images is None) == (folder is None):
        raise ParseError("give images or a folder (not both)")
    if folder is not None:
        pixels, names, skipped = _read_folder(folder, size)
    else:
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        pixels, names, skipped = [], [], []
        for i, item in enumerate(images):
            if isinstance(item, (str, os.PathLike)):
                p, n, s = _read_files([item], size)
                pixels += p
                names += n
                skipped += s
                continue
            if not isinstance(item, Image.Image):
                item = Image.fromarray(check_pixels(item, f"image {i}"))
            pixels.append(np.asarray(cache_lib.to_rgb(item).resize((size, size), Image.BILINEAR),
                                     np.uint8))
            names.append(f"<image {i}>")
    if not pixels:
        where = f"folder {folder}" if folder is not None else "the given images"
        detail = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise ParseError(f"no readable image in {where}" + (f" ({len(skipped)} skipped: {detail}"
                                                            + (" ..." if len(skipped) > 3 else "") + ")"
                                                            if skipped else ""))
    return np.stack(pixels), names, skipped


# ------------------------------------------------------------------------------------------------
# Outputs -> the report.


def normalise(raw: np.ndarray) -> np.ndarray:
    """Official per-class sigmoids [..., K] -> probabilities summing to one over K."""
    raw = np.asarray(raw, np.float64)
    return raw / raw.sum(axis=-1, keepdims=True)


def _num(x) -> float:
    return round(float(x), 6)  # JSON for readers: float32 outputs carry no more digits


def _classification(t: targets.Target, names: Sequence[str], probs: np.ndarray, raw: np.ndarray) -> dict:
    k = int(np.argmax(probs))
    entry = {"class": names[k], "class_id": k,
             "probs": {n: _num(p) for n, p in zip(names, probs)},
             "raw": {n: _num(r) for n, r in zip(names, raw)}}
    if t.kind in (targets.FLAG, targets.GROUP):
        entry.update(used=k == 1, p_used=_num(probs[1]))
    if t.kind == targets.FLAG:
        entry["group"] = t.group
    return entry


def _counts(vocab: Vocabulary, normalised: np.ndarray) -> dict:
    out = {}
    for t, x in zip(targets.CONTINUOUS_TARGETS, normalised):
        out[t.name] = {"normalised": _num(x)}
        value = vocab.count_value(t.name, x)
        if value is not None:
            out[t.name]["value"] = float(f"{value:.6g}")
    return out


def build_report(outputs: Mapping, names: Sequence, vocab: Vocabulary) -> dict:
    """Per-image and whole-set results from official outputs ({'continuous', 'probs'}, NumPy)."""
    from adaparse_jax import metrics

    cont = np.asarray(outputs["continuous"], np.float64)
    raw = {t.name: np.asarray(outputs["probs"][t.name], np.float64) for t in targets.CLASSIFICATION_TARGETS}
    probs = {k: normalise(v) for k, v in raw.items()}
    images = []
    for i, name in enumerate(names):
        r = {"image": name, targets.CONTINUOUS: _counts(vocab, cont[i])}
        for family, ts in _FAMILIES:
            r[family] = {t.name: _classification(t, vocab.class_names[t.name], probs[t.name][i],
                                                 raw[t.name][i]) for t in ts}
        images.append(r)
    whole = {"num_images": len(names), targets.CONTINUOUS: _counts(vocab, cont.mean(axis=0))}
    for family, ts in _FAMILIES:
        whole[family] = {}
        for t in ts:
            cls_names = vocab.class_names[t.name]
            decisions = probs[t.name].argmax(axis=-1)
            vote = metrics.majority_vote(decisions, t.num_classes)
            mean = probs[t.name].mean(axis=0)
            entry = {"vote": cls_names[vote], "vote_id": vote,
                     "votes": {n: int(c) for n, c in zip(cls_names, np.bincount(decisions,
                                                                               minlength=t.num_classes))},
                     "mean_probs": {n: _num(p) for n, p in zip(cls_names, mean)}}
            if t.kind in (targets.FLAG, targets.GROUP):
                entry.update(used=vote == 1, mean_p_used=_num(mean[1]))
            whole[family][t.name] = entry
    return {"images": images, "set": whole}


def open_runs(workdirs: Sequence, step: int | None = None, *,
              allow_untrained: bool = False) -> tuple[list, Vocabulary, str]:
    """(runs, vocabulary, warnings) of one run or an ensemble's members, which must read the same
    input size and name the same classes and count ranges (else ParseError naming the member)."""
    if not workdirs:
        raise ParseError("no workdir given")
    if step is not None and len(workdirs) > 1:
        raise ParseError(f"a checkpoint step ({step}) applies to one run; an ensemble of "
                         f"{len(workdirs)} runs uses each run's selected checkpoint")
    opened = [open_run(w, step, allow_untrained=allow_untrained) for w in workdirs]
    runs = [run for run, _ in opened]
    first, vocab = runs[0], run_vocabulary(runs[0])
    for run in runs[1:]:
        if run.spec.image_size != first.spec.image_size:
            raise ParseError(f"{run.workdir} reads {run.spec.image_size} px images, {first.workdir} "
                             f"{first.spec.image_size} px: an ensemble's members must read the same size")
        other = run_vocabulary(run)
        if (other.class_names, other.count_ranges) != (vocab.class_names, vocab.count_ranges):
            raise ParseError(f"{run.workdir}'s dataset names other classes or count ranges than "
                             f"{first.workdir}'s: an ensemble's members must parse into the same words")
    warnings = "; ".join(f"{run.workdir}: {w}" if len(runs) > 1 else w
                         for run, (_, w) in zip(runs, opened) if w)
    return runs, vocab, warnings


def parse(workdir: str | os.PathLike | Sequence[str | os.PathLike], images: Sequence | None = None, *,
          folder=None, step: int | None = None, batch_size: int = 64,
          allow_untrained: bool = False) -> dict:
    """Parse images with the run in `workdir` (see the module docstring for the report's keys).

    Args:
      workdir: a training run's workdir (or one written by `python -m adaparse_jax.convert`), or
        a list of them: an ensemble (e.g. one fold trained with several seeds, the demo's
        `config.seeds`), whose outputs are per image the mean of its members' official outputs,
        the rule `evaluation.ensemble_predictions` scores ensembles by. The report's "workdir",
        "step" and "arch" are then lists, one entry per member, and "ensemble_of" counts them.
      images: file paths, uint8 [H, W, 3] arrays or PIL images; or
      folder: a folder of images (recursive).
      step: checkpoint step (default: the run's selected checkpoint); one run only.
      batch_size: images per forward pass.
      allow_untrained: parse with a checkpoint that records untrained parts (see `convert`).
    """
    workdirs = [workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir)
    runs, vocab, warning = open_runs(workdirs, step, allow_untrained=allow_untrained)
    pixels, names, skipped = read_images(images, folder, runs[0].spec.image_size)
    outputs = [predict_pixels(run, pixels, batch_size) for run in runs]
    mean = {"continuous": np.mean([o["continuous"] for o in outputs], axis=0, dtype=np.float64),
            "probs": {k: np.mean([o["probs"][k] for o in outputs], axis=0, dtype=np.float64)
                      for k in outputs[0]["probs"]}}
    if len(runs) == 1:
        about = {"workdir": str(runs[0].workdir), "step": runs[0].step, "arch": runs[0].config.model.arch}
    else:
        about = {"workdir": [str(r.workdir) for r in runs], "step": [r.step for r in runs],
                 "arch": [r.config.model.arch for r in runs], "ensemble_of": len(runs)}
    report = {**about, "class_names": vocab.source, **build_report(mean, names, vocab), "skipped": skipped}
    if warning:
        report["warning"] = warning
    return report


# ------------------------------------------------------------------------------------------------
# Markdown.


def _title(name: str) -> str:
    return targets.BY_NAME[name].title


def _fmt_count(entry: Mapping) -> str:
    text = f"{entry['normalised']:.3f}"
    return text + (f" ({entry['value']:.4g})" if "value" in entry else "")


def markdown(report: Mapping) -> str:
    """The report as Markdown: the whole set, then every image, then the skipped files."""
    s = report["set"]
    if "ensemble_of" in report:
        members = ", ".join(f"{w} (step {st}, {a})" for w, st, a in
                            zip(report["workdir"], report["step"], report["arch"]))
        lines = [f"# Parsed {s['num_images']} images with an ensemble of {report['ensemble_of']} runs", "",
                 f"Members (the mean of their outputs): {members}.", ""]
    else:
        lines = [f"# Parsed {s['num_images']} images with {report['workdir']} "
                 f"(checkpoint step {report['step']}, {report['arch']})", ""]
    if report.get("warning"):
        lines += [f"**Warning: {report['warning']}**", ""]
    lines += [f"Class names: {report['class_names']}.", "",
              "## Whole set: majority vote of the per-image decisions, mean normalised probability", "",
              "| target | vote | mean probability of the vote | votes |", "|---|---|---|---|"]
    for family, ts in _FAMILIES:
        for t in ts:
            e = s[family][t.name]
            votes = ", ".join(f"{n} {c}" for n, c in e["votes"].items())
            lines.append(f"| {t.title} | {e['vote']} | {e['mean_probs'][e['vote']]:.3f} | {votes} |")
    lines += ["", "| count | mean normalised (real units) |", "|---|---|"]
    lines += [f"| {t.title} | {_fmt_count(s[targets.CONTINUOUS][t.name])} |"
              for t in targets.CONTINUOUS_TARGETS]
    lines += ["", "## Per image: decision (normalised probability)", "",
              "| image | " + " | ".join(t.title for t in targets.DISCRETE_TARGETS)
              + " | loss groups used | loss flags used |",
              "|---" * (len(targets.DISCRETE_TARGETS) + 3) + "|"]
    for r in report["images"]:
        picks = [r["discrete"][t.name] for t in targets.DISCRETE_TARGETS]
        cells = [f"{d['class']} ({d['probs'][d['class']]:.2f})" for d in picks]
        groups = ", ".join(_title(n) for n, e in r["loss_groups"].items() if e["used"]) or "none"
        flags = ", ".join(_title(n) for n, e in r["loss_flags"].items() if e["used"]) or "none"
        lines.append(f"| {r['image']} | " + " | ".join(cells) + f" | {groups} | {flags} |")
    lines += ["", "| image | " + " | ".join(t.title for t in targets.CONTINUOUS_TARGETS) + " |",
              "|---" * (len(targets.CONTINUOUS_TARGETS) + 1) + "|"]
    for r in report["images"]:
        lines.append(f"| {r['image']} | " + " | ".join(_fmt_count(r[targets.CONTINUOUS][t.name])
                                                       for t in targets.CONTINUOUS_TARGETS) + " |")
    lines += ["", f"## Skipped files ({len(report['skipped'])})", ""]
    lines += [f"- {e['path']}: {e['reason']}" for e in report["skipped"]] or ["none"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None, prog: str = "python -m adaparse_jax.parse") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, action="append",
                   help="a training run's workdir; repeat it for an ensemble (the mean of the runs' outputs)")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--images", dest="images_flag", nargs="+", help=argparse.SUPPRESS)  # predict's form
    p.add_argument("--folder", help="a folder of images (recursive)")
    p.add_argument("--out", help="write the report here (default: stdout)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="json or md (default: from --out's suffix, else json)")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: the selected one; one --workdir only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--allow-untrained", "--allow_untrained", action="store_true",
                   help="parse with a checkpoint that records untrained parts (a converted RE-Net FEN)")
    args = p.parse_args(argv)
    files = list(args.images) + list(args.images_flag or [])
    if bool(files) == bool(args.folder):
        p.print_usage(sys.stderr)
        print(f"{prog}: error: give image files or --folder DIR (one of them)", file=sys.stderr)
        return 2
    fmt = args.format or ("md" if args.out and Path(args.out).suffix == ".md" else "json")

    from adaparse_jax import checkpointing

    try:
        report = parse(args.workdir, files or None, folder=args.folder, step=args.step,
                       batch_size=args.batch_size, allow_untrained=args.allow_untrained)
    except (ParseError, FileNotFoundError, checkpointing.CheckpointMismatchError,
            checkpointing.UntrainedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(report) if fmt == "md" else json.dumps(report, indent=1)
    for s in report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"parsed {len(report['images'])} images ({len(report['skipped'])} skipped) -> {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
