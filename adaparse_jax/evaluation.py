"""Evaluate training runs on their test generators and build the papers' tables.

    from adaparse_jax import evaluation
    report = evaluation.evaluate(["runs/re116_s*", "runs/renet_s*"], "results/")

Each workdir is one split of one method. `evaluate_run(workdir)`:

- reads the config the run saved, its dataset and split (the test generators of that split);
- picks the checkpoint: the best by validation score when the run had validation generators
  (`selection.json`), the last one otherwise; never anything measured on test generators;
- predicts every test image (or reuses `<workdir>/eval/test_predictions_step<S>.npz`, which holds
  per-image predictions, probabilities, generator rows, true label rows and source paths, so any
  number in the tables can be recomputed from it);
- scores them with `metrics.compute_metrics`: per image, and per generator from N = 1, 10, 100 and
  all of its images (mean of continuous values, majority vote of class ids);
- scores the mean/mode baseline fitted on the split's training generators (train + validation),
  with true labels;
- counts the confusion matrices of the discrete targets.

`evaluate(workdirs, out)` groups the runs by label (`runs.run_label`: AdaParse, RE-Net,
Random G.T. (...) or config.label), takes mean and standard deviation over the splits of each, and
writes `out/tables.md`, `out/results.json` and `out/confusion_<label>.png` (`reporting`).

Labels are always the dataset's true labels, also for Random G.T. runs (whose training labels were
permuted).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix

from adaparse_jax import atomic, checkpointing, reporting, runs, targets
from adaparse_jax import metrics as metrics_lib
from adaparse_jax.data import pipeline
from adaparse_jax.runs import BASELINE_LABEL, load_saved_config, method_rank, run_label
from adaparse_jax.train.data import load_split, setup_data
from adaparse_jax.train.state import predict_batches

EVAL_DIR = "eval"
DEFAULT_IMAGES_PER_GENERATOR = metrics_lib.DEFAULT_IMAGES_PER_GENERATOR


# ------------------------------------------------------------------------------------------------
# Predictions on disk.


def save_predictions(path: str | Path, predictions: Mapping, *, generator_names: Sequence[str],
                     paths: Sequence[str] = ()) -> None:
    """Write per-image predictions as .npz (keys: 'continuous', each target name, 'prob_<name>',
    'generator', 'label_rows', 'generator_names', 'paths')."""
    arrays = {"continuous": np.asarray(predictions["continuous"], np.float32),
              "generator": np.asarray(predictions["generator"], np.int32),
              "label_rows": np.asarray(predictions["label_rows"], np.float32),
              "generator_names": np.asarray(list(generator_names), dtype=str),
              "paths": np.asarray(list(paths), dtype=str)}
    for t in targets.CLASSIFICATION_TARGETS:
        arrays[t.name] = np.asarray(predictions[t.name], np.int32)
        arrays[f"prob_{t.name}"] = np.asarray(predictions[f"prob/{t.name}"], np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write(path, lambda f: np.savez_compressed(f, **arrays))


def load_predictions(path: str | Path) -> dict:
    """Inverse of `save_predictions` ('prob_<name>' back to 'prob/<name>')."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for t in targets.CLASSIFICATION_TARGETS:
        out[f"prob/{t.name}"] = out.pop(f"prob_{t.name}")
    return out


def ensemble_predictions(members: Sequence[Mapping], names: Sequence[str] = ()) -> dict:
    """The predictions of an ensemble: per image, the mean of the members' class probabilities
    (each target's decision is its argmax) and of their continuous predictions.

    Args:
      members: `load_predictions` results of runs that predicted the same images in the same
        order (e.g. one fold trained with several seeds).
      names: one name per member for the error message (e.g. their files).

    Raises ValueError when the members' images ('generator', and 'paths' where recorded) differ.
    """
    if not members:
        raise ValueError("ensemble_predictions: no members")
    first = members[0]
    names = list(names) or [f"member {i}" for i in range(len(members))]
    for name, m in zip(names[1:], members[1:]):
        for key in ("generator", "paths"):
            if key in first and not np.array_equal(np.asarray(m[key]), np.asarray(first[key])):
                raise ValueError(f"{name}: predicts other images than {names[0]} ({key!r} differs); "
                                 "an ensemble's members must predict the same test images")
    out = dict(first)
    out[targets.CONTINUOUS] = np.mean([np.asarray(m[targets.CONTINUOUS], np.float64) for m in members],
                                      axis=0).astype(np.float32)
    for t in targets.CLASSIFICATION_TARGETS:
        prob = np.mean([np.asarray(m[f"prob/{t.name}"], np.float64) for m in members], axis=0)
        out[f"prob/{t.name}"] = prob.astype(np.float32)
        out[t.name] = prob.argmax(-1).astype(np.int32)
    return out


def _decisions(predictions: Mapping) -> dict:
    keys = [targets.CONTINUOUS] + [t.name for t in targets.CLASSIFICATION_TARGETS]
    return {k: predictions[k] for k in keys}


def confusion_matrices(predictions: Mapping, label_rows: np.ndarray) -> dict[str, list[list[int]]]:
    """Counts [true class, predicted class] of every discrete target."""
    labels = targets.split_labels(np.asarray(label_rows))
    return {t.name: confusion_matrix(labels[t.name], np.asarray(predictions[t.name]),
                                     labels=list(range(t.num_classes))).tolist()
            for t in targets.DISCRETE_TARGETS}


def headline(metrics: Mapping[str, float], prefix: str = "") -> str:
    """One line of the main numbers (for logs)."""
    return (f"F1 flags {metrics[prefix + 'f1/flags_mean']:.3f}, F1 discrete "
            f"{metrics[prefix + 'f1/discrete_mean']:.3f}, L1 continuous "
            f"{metrics[prefix + 'l1/continuous_mean']:.3f}")


# ------------------------------------------------------------------------------------------------
# One run.


def evaluate_run(workdir: str | os.PathLike, *, step: int | None = None,
                 eval_step: Callable | None = None, reuse: bool = True,
                 images_per_generator: Sequence[int | None] = DEFAULT_IMAGES_PER_GENERATOR,
                 seed: int = 0, allow_untrained: bool = False, with_metrics: bool = True) -> dict:
    """Evaluate one run on its split's test generators (see the module docstring).

    Args:
      step: the checkpoint to evaluate (default: `checkpointing.selected_step`).
      eval_step: a jitted eval step of this run's model (built when None).
      reuse: reuse saved predictions of the same checkpoint instead of predicting again.
      images_per_generator, seed: the per-generator aggregation (`metrics.compute_metrics`).
      allow_untrained: evaluate a checkpoint whose record lists untrained parts (a converted
        RE-Net FEN with a random parser, `convert`); refused otherwise
        (`checkpointing.UntrainedModelError`).
      with_metrics: False makes sure the predictions exist and returns the run's facts without
        scoring them (no 'metrics', 'baseline_metrics', 'confusion' keys, nothing written): what
        `scoring.score_runs` needs, which pools the predictions of all folds itself.

    Returns a dict with 'label', 'split', 'step', 'selection', 'metrics', 'baseline_metrics',
    'confusion', 'predictions' (the .npz path) and the generator lists; also written as
    `<workdir>/eval/test_metrics_step<S>.json`.
    """
    workdir = Path(workdir).resolve()
    config = load_saved_config(workdir)
    dataset, split = load_split(config)  # the cache is read only when predicting
    if step is None:
        step, why = checkpointing.selected_step(workdir)
    else:
        why = "requested"
    checkpointing.check_trained(workdir, step, allow_untrained)
    pred_path = workdir / EVAL_DIR / f"test_predictions_step{step}.npz"
    if reuse and pred_path.is_file():
        preds = load_predictions(pred_path)
    else:
        restored = runs.load(workdir, step)
        eval_step = eval_step or restored.eval_step
        run = setup_data(config)
        with pipeline.Loader(run.cache, split.test, batch_size=config.data.eval_batch_size,
                             train=False, mode=config.data.loader, names=dataset.names) as loader:
            preds = predict_batches(eval_step, restored.variables, loader,
                                              config.data.eval_batch_size)
            source_paths = [run.cache.paths[i] for i in loader.records]
        preds["label_rows"] = dataset.labels[preds["generator"]]
        save_predictions(pred_path, preds, generator_names=dataset.names, paths=source_paths)
        preds = load_predictions(pred_path)
    label_rows, generators = preds["label_rows"], preds["generator"]
    result = {
        "workdir": str(workdir),
        "label": run_label(config),
        "arch": config.model.arch,
        "random_gt": bool(config.random_gt),
        "dataset": dataset.name,
        "split": str(config.split),
        "step": int(step),
        "selection": why,
        "train_generators": list(split.train),
        "val_generators": list(split.val),
        "test_generators": list(split.test),
        "num_images": int(len(label_rows)),
        "predictions": str(pred_path),
    }
    if not with_metrics:
        return result
    scores = metrics_lib.compute_metrics(_decisions(preds), label_rows, generators,
                                         images_per_generator=images_per_generator, seed=seed)
    train_rows = dataset.labels[dataset.rows(split.train + split.val)]
    baseline = metrics_lib.mean_mode_baseline(train_rows, len(label_rows))
    baseline_scores = metrics_lib.compute_metrics(baseline, label_rows, generators,
                                                  images_per_generator=images_per_generator, seed=seed)
    result.update({
        "images_per_generator": [n if n is not None else "all" for n in images_per_generator],
        "metrics": scores,
        "baseline_metrics": baseline_scores,
        "confusion": confusion_matrices(preds, label_rows),
        "baseline_confusion": confusion_matrices(baseline, label_rows),
    })
    out = workdir / EVAL_DIR / f"test_metrics_step{step}.json"
    atomic.write_json(out, result)
    return result


# ------------------------------------------------------------------------------------------------
# Several runs -> tables.


def expand_workdirs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Workdirs from paths or glob patterns, in the order given (duplicates dropped).

    Raises FileNotFoundError for a pattern that matches no training workdir.
    """
    out: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        dirs = [Path(m).resolve() for m in matches if (Path(m) / "config.json").is_file()]
        if not dirs:
            raise FileNotFoundError(f"--workdir {text}: no training workdir (a directory with config.json)"
                                    + (" matches" if glob.has_magic(text) else " there"))
        out.extend(d for d in dirs if d not in out)
    return out


def _aggregate(per_split: Mapping[str, Mapping[str, float]]) -> tuple[dict, dict]:
    """Mean and (population) standard deviation over splits of every metric all splits have."""
    keys = set.intersection(*(set(m) for m in per_split.values()))
    mean = {k: float(np.mean([m[k] for m in per_split.values()])) for k in sorted(keys)}
    std = {k: float(np.std([m[k] for m in per_split.values()])) for k in sorted(keys)}
    return mean, std


def _sum_confusion(items: Sequence[Mapping[str, list]]) -> dict:
    return {name: np.sum([np.asarray(c[name]) for c in items], axis=0).tolist() for name in items[0]}


def evaluate(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
             images_per_generator: Sequence[int | None] = DEFAULT_IMAGES_PER_GENERATOR,
             seed: int = 0, reuse: bool = True, allow_untrained: bool = False) -> dict:
    """Evaluate runs (one workdir per split and method), aggregate over splits, write the report.

    Args:
      workdirs: workdir paths or glob patterns.
      out: output directory for tables.md, results.json and the confusion-matrix PNGs (None: no
        files are written).

    Returns the report: 'methods' (per label: splits, workdirs, checkpoint steps, per-split
    metrics, mean, std, summed confusion counts) and 'baseline' (the mean/mode baseline of the same
    splits), as also written to results.json.
    """
    results = [evaluate_run(d, images_per_generator=images_per_generator, seed=seed, reuse=reuse,
                            allow_untrained=allow_untrained)
               for d in expand_workdirs(workdirs)]
    methods: dict[str, dict] = {}
    baseline_splits: dict[tuple[str, str], dict] = {}
    for r in results:
        m = methods.setdefault(r["label"], {"label": r["label"], "runs": []})
        other = [x for x in m["runs"] if x["split"] == r["split"] and x["dataset"] == r["dataset"]]
        if other:
            raise ValueError(f"two runs labelled {r['label']!r} for split {r['split']} of {r['dataset']}: "
                             f"{other[0]['workdir']} and {r['workdir']}; give each method one workdir "
                             "per split (or set config.label to tell them apart)")
        m["runs"].append(r)
        key = (r["dataset"], r["split"])
        prev = baseline_splits.get(key)
        if prev is not None and prev["test_generators"] != r["test_generators"]:
            raise ValueError(f"runs of split {r['split']} of {r['dataset']} test different generators")
        baseline_splits.setdefault(key, r)
    several = len({r["dataset"] for r in results}) > 1

    def split_key(r: Mapping) -> str:
        """A run's split, named with its dataset when the report spans several (as duplicates are
        found): two datasets' split 1 are two entries, never one overwriting the other."""
        return f"{r['dataset']}/{r['split']}" if several else r["split"]

    report_methods = []
    for m in sorted(methods.values(), key=lambda m: method_rank(m["label"])):
        per_split = {split_key(r): r["metrics"] for r in m["runs"]}
        mean, std = _aggregate(per_split)
        report_methods.append({
            "label": m["label"],
            "splits": [split_key(r) for r in m["runs"]],
            "workdirs": [r["workdir"] for r in m["runs"]],
            "steps": [r["step"] for r in m["runs"]],
            "selection": [r["selection"] for r in m["runs"]],
            "num_images": [r["num_images"] for r in m["runs"]],
            "per_split": per_split,
            "mean": mean,
            "std": std,
            "confusion": _sum_confusion([r["confusion"] for r in m["runs"]]),
            "predictions": [r["predictions"] for r in m["runs"]],
        })
    base_runs = list(baseline_splits.values())
    base_per_split = {split_key(r): r["baseline_metrics"] for r in base_runs}
    base_mean, base_std = _aggregate(base_per_split)
    report = {
        "datasets": sorted({r["dataset"] for r in results}),
        "images_per_generator": [n if n is not None else "all" for n in images_per_generator],
        "aggregation_seed": seed,
        "std": "population standard deviation over splits (numpy.std, ddof=0)",
        "methods": report_methods,
        "baseline": {
            "label": BASELINE_LABEL,
            "splits": [split_key(r) for r in base_runs],
            "fit_on": "training generators of each split (train + validation), true labels",
            "per_split": base_per_split,
            "mean": base_mean,
            "std": base_std,
            "confusion": _sum_confusion([r["baseline_confusion"] for r in base_runs]),
        },
    }
    if out is not None:
        report["files"] = reporting.write_report(report, out)
    return report
