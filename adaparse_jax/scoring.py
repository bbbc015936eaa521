"""Honest scoring of k-fold model parsing: held-out predictions of every generator, macro F1 per
attribute at the generator and the image level, Random-G.T. replicates, permutation p-values.

With a few dozen generators the numbers of one split are noise (one generator more or less right
moves a macro F1 by 0.05-0.2), so the score is built to say how sure it is:

1. **k-fold over all generators.** A method is trained once per fold (the dataset's test splits,
   e.g. the zoo's k folds); each generator is held out exactly once, and the held-out predictions
   of all folds are pooled, so every generator is scored once and G (not G / k) generators stand
   behind every number. Model selection inside a fold uses validation generators carved from that
   fold's training generators (`config.data.num_val`); this module only reads what the runs
   predicted on their test generators.
2. **Two granularities.** Generator level: one decision per generator, the majority vote of its
   images' class ids (the mean of its continuous predictions), `metrics.aggregate_by_generator`
   with all images. Image level: every image against its generator's labels.
3. **Macro F1** per discrete attribute, loss flag and coarse group (`sklearn.metrics.f1_score`,
   average='macro', zero_division=0, over the classes present in labels or decisions: the
   project's convention, `metrics.score`); L1 per count. Means over a family (e.g. the 6 discrete
   attributes) average the per-attribute values.
4. **Permutation p-value per attribute** (`permutation_test`): the null hypothesis is that the
   held-out decisions carry no information about the attribute. Under it, which generator has
   which label is exchangeable, so the generators' labels are permuted among the G held-out
   generators (the decisions stay; at the image level every image takes its generator's permuted
   label, so images of a generator move together and are not treated as independent), and the
   statistic (macro F1; for a count, minus the L1 error) is recomputed for each permutation.
   p = (1 + #{permutations with statistic >= observed}) / (1 + n_resamples)
   (`scipy.stats.permutation_test`, permutation_type='pairings', alternative 'greater' for F1 and
   'less' for L1: the conservative Monte-Carlo estimate, never 0; n_resamples = 9999 resolves
   p down to 1e-4). p-values are per attribute and not adjusted for multiple comparisons.
5. **Random G.T. replicates.** The papers' Random G.T. baseline (the same method trained on the
   training generators' label rows permuted, `config.random_gt`) is run for several
   `random_gt_seed`s, each a full k-fold; its row shows mean ± std over the seeds (population std),
   so "beats Random G.T." is judged against the spread of the baseline, not one draw. The
   permutation test is the finer-grained reference: a method that learned nothing behaves like one
   permutation.
6. **Mean/mode predictor**: per fold, the mean of each count and the mode of each class over the
   fold's training generators (train + validation, true labels), `metrics.mean_mode_baseline`.

`score_runs(workdirs)` reads runs (each `evaluation.evaluate_run`, which reuses saved test
predictions), groups them into methods (the run label, `training.run_label`) and replicates (one
per `random_gt_seed` of a Random G.T. method, one per training `seed` otherwise), pools each
replicate's folds and scores it; `goal(report)` checks the issue's bench-zoo criterion;
`markdown(report)` lays out the three tables (loss flags with the coarse groups, discrete
architecture, continuous) at both granularities.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.stats
from sklearn.metrics import f1_score

from adaparse_jax import metrics as metrics_lib
from adaparse_jax import targets

N_RESAMPLES = 9999
BASELINE_LABEL = "Mean/mode predictor"
RANDOM_GT_PREFIX = "Random G.T."
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


# ------------------------------------------------------------------------------------------------
# Runs -> methods -> replicates.


def _run_info(workdir: Path) -> dict:
    from adaparse_jax import train as training

    config = training.load_saved_config(workdir)
    random_gt = bool(config.random_gt)
    return {"label": training.run_label(config), "random_gt": random_gt,
            "replicate": int(config.random_gt_seed if random_gt else config.seed)}


def mean_predictor(dataset, runs: Sequence[Mapping]) -> HeldOut:
    """The mean/mode predictor, fitted per fold on its training generators, as a HeldOut.

    Args:
      dataset: the runs' `data.re116.Dataset`.
      runs: `evaluation.evaluate_run` results of one replicate (one per fold).
    """
    parts = []
    for r in runs:
        rows = dataset.rows(r["test_generators"])
        with np.load(r["predictions"], allow_pickle=False) as z:
            gens = z["generator"]
        base = metrics_lib.mean_mode_baseline(
            dataset.labels[dataset.rows(list(r["train_generators"]) + list(r["val_generators"]))],
            len(gens))
        outside = sorted(set(np.unique(gens).tolist()) - set(rows.tolist()))
        if outside:
            raise ValueError(f"{r['predictions']}: predictions of generators {outside}, which are not "
                             f"test generators of split {r['split']}")
        parts.append((r["split"], {**base, "generator": gens, "label_rows": dataset.labels[gens]}))
    return pool(parts, [r["workdir"] for r in runs])


def _summary(replicates: Sequence[Mapping]) -> dict:
    """Mean and population std over replicates of every number of `score_held_out`; p-values: max."""
    out: dict = {"targets": {}, "means": {}}
    for name in replicates[0]["targets"]:
        entry = {}
        for k in replicates[0]["targets"][name]:
            values = np.array([r["targets"][name][k] for r in replicates], np.float64)
            if k.startswith("p_"):
                entry[k] = float(values.max())  # the least significant replicate
            else:
                entry[k] = float(values.mean())
                entry[k + "_std"] = float(values.std())
        out["targets"][name] = entry
    for k in replicates[0]["means"]:
        values = np.array([r["means"][k] for r in replicates], np.float64)
        out["means"][k] = float(values.mean())
        out["means"][k + "_std"] = float(values.std())
    return out


def _method_rank(label: str) -> tuple[int, str]:
    order = ("AdaParse", "RE-Net")
    if label in order:
        return order.index(label), label
    return (3 if label.startswith(RANDOM_GT_PREFIX) else 2), label


def score_runs(workdirs: Sequence[str | os.PathLike], *, n_resamples: int = N_RESAMPLES,
               seed: int = 0) -> dict:
    """Score k-fold runs (workdirs or glob patterns), see the module docstring.

    Every replicate must cover the same generators (normally all of the dataset, one fold each);
    the report says how many. Returns {'dataset', 'num_generators', 'num_images', 'folds',
    'n_resamples', 'seed', 'methods': [...], 'baseline': {...}}; each method holds its label, its
    replicates (key, workdirs, scores) and the summary over replicates.
    """
    from adaparse_jax import evaluation
    from adaparse_jax import train as training
    from adaparse_jax.data import re116

    dirs = evaluation.expand_workdirs(workdirs)
    groups: dict[str, dict[int, list]] = {}
    for d in dirs:
        info = _run_info(d)
        result = evaluation.evaluate_run(d)
        groups.setdefault(info["label"], {}).setdefault(info["replicate"], []).append(result)
    first = next(iter(next(iter(groups.values())).values()))[0]
    config = training.load_saved_config(first["workdir"])
    dataset = re116.load_dataset(config.data.dataset) if config.data.dataset else re116.load_dataset(
        images=config.data.images, labels=config.data.labels, variant=config.data.variant)
    covered = None
    methods = []
    for label in sorted(groups, key=_method_rank):
        replicates = []
        for key in sorted(groups[label]):
            runs = sorted(groups[label][key], key=lambda r: r["split"])
            if {r["dataset"] for r in runs} != {dataset.name}:
                raise ValueError(f"runs of {label!r} use datasets {sorted({r['dataset'] for r in runs})}; "
                                 f"score one dataset at a time ({dataset.name})")
            parts = [(r["split"], evaluation.load_predictions(r["predictions"])) for r in runs]
            held = pool(parts, [r["workdir"] for r in runs])
            gens = sorted(np.unique(held.generators).tolist())
            if covered is None:
                covered = gens
                folds = sorted(r["split"] for r in runs)
                baseline_runs = runs
            elif gens != covered:
                raise ValueError(f"{label!r} replicate {key} holds out {len(gens)} generators, another "
                                 f"replicate {len(covered)} (or other ones); every replicate must "
                                 "cover the same folds")
            scores = score_held_out(held, n_resamples=n_resamples, seed=seed)
            replicates.append({"key": key, "folds": sorted(r["split"] for r in runs),
                               "workdirs": [r["workdir"] for r in runs],
                               "selected_steps": [r["step"] for r in runs], **scores})
        methods.append({"label": label, "random_gt": label.startswith(RANDOM_GT_PREFIX),
                        "replicates": replicates, **_summary(replicates)})
    base = score_held_out(mean_predictor(dataset, baseline_runs), n_resamples=n_resamples, seed=seed,
                          with_pvalues=False)
    return {
        "dataset": dataset.name,
        "num_generators": len(covered),
        "num_dataset_generators": len(dataset.names),
        "num_images": methods[0]["replicates"][0]["num_images"],
        "folds": folds,
        "n_resamples": n_resamples,
        "seed": seed,
        "methods": methods,
        "baseline": {"label": BASELINE_LABEL, "replicates": [base], **_summary([base])},
    }


# ------------------------------------------------------------------------------------------------
# The criterion.


def goal(report: Mapping, method: str = "AdaParse", random_gt: str | None = None, *,
         margin: float = 0.10, alpha: float = 0.01, min_significant: int = 4) -> dict:
    """Does `method` beat Random G.T. and the mean predictor as the bench-zoo goal asks?

    Criteria (generator level): mean discrete-architecture macro F1 of `method` minus that of the
    Random G.T. method (mean over its seeds) >= margin; p_generator < alpha on at least
    `min_significant` of the 6 discrete attributes; mean L1 over the 9 counts below the mean
    predictor's. Also lists each attribute's verdict.
    """
    by_label = {m["label"]: m for m in report["methods"]}
    if method not in by_label:
        raise KeyError(f"no method {method!r} in the report; methods are {sorted(by_label)}")
    rgt_label = random_gt or f"{RANDOM_GT_PREFIX} ({method})"
    m = by_label[method]
    rgt = by_label.get(rgt_label)
    base = report["baseline"]
    disc = [t.name for t in targets.DISCRETE_TARGETS]
    significant = [n for n in disc if m["targets"][n]["p_generator"] < alpha]
    out = {
        "method": method,
        "random_gt": rgt_label if rgt is not None else None,
        "discrete_f1": m["means"]["discrete/f1_generator"],
        "random_gt_discrete_f1": rgt["means"]["discrete/f1_generator"] if rgt else None,
        "significant": significant,
        "counts_l1": m["means"]["continuous/l1_generator"],
        "mean_predictor_counts_l1": base["means"]["continuous/l1_generator"],
        "counts_better": [t.name for t in targets.CONTINUOUS_TARGETS
                          if m["targets"][t.name]["l1_generator"] < base["targets"][t.name]["l1_generator"]],
    }
    out["margin"] = out["discrete_f1"] - out["random_gt_discrete_f1"] if rgt else None
    out["beats_random_gt"] = bool(rgt) and out["margin"] >= margin
    out["enough_significant"] = len(significant) >= min_significant
    out["beats_mean_predictor"] = out["counts_l1"] < out["mean_predictor_counts_l1"]
    out["met"] = out["beats_random_gt"] and out["enough_significant"] and out["beats_mean_predictor"]
    out["criteria"] = {"margin": margin, "alpha": alpha, "min_significant": min_significant}
    return out


# ------------------------------------------------------------------------------------------------
# Tables.


def _p(p: float) -> str:
    return f"p={p:.4f}" if p >= 1e-4 else f"p={p:.1e}"


def _cell(m: Mapping, name: str, key: str, pvalues: bool) -> str:
    e = m["targets"][name]
    if len(m["replicates"]) > 1:
        text = f"{e[key]:.3f} ± {e[key + '_std']:.3f}"
    else:
        text = f"{e[key]:.3f}"
    pk = "p_" + key.split("_", 1)[1]
    if pvalues and pk in e:
        text += f" ({_p(e[pk])})"
    return text


def _mean_cell(m: Mapping, key: str) -> str:
    if len(m["replicates"]) > 1:
        return f"{m['means'][key]:.3f} ± {m['means'][key + '_std']:.3f}"
    return f"{m['means'][key]:.3f}"


TABLES = (
    ("Table II: loss-function flags, macro F1", "flags", "f1"),
    ("Coarse loss groups, macro F1", "groups", "f1"),
    ("Table III: discrete architecture, macro F1", "discrete", "f1"),
    ("Table IV: continuous architecture, L1 error (lower is better)", "continuous", "l1"),
)


def markdown(report: Mapping, *, granularities: Sequence[str] = ("generator", "image"),
             pvalues: bool = True) -> str:
    """The tables of a `score_runs` report (see the module docstring for every definition)."""
    rows = [*report["methods"], report["baseline"]]
    lines = [
        f"Held-out generators of {report['dataset']}: {report['num_generators']} generators "
        f"({report['num_images']} images), each held out once by {len(report['folds'])}-fold "
        f"cross-validation (folds {', '.join(report['folds'])}). Cells: pooled held-out score"
        + (f" (generator-permutation p-value, {report['n_resamples']} permutations)" if pvalues else "")
        + "; Random G.T.: mean ± std over its seeds, p the largest over seeds.",
        "",
    ]
    for m in rows:
        if m["label"] != BASELINE_LABEL:
            lines.append(f"- **{m['label']}**: {len(m['replicates'])} replicate(s) "
                         f"(seeds {', '.join(str(r['key']) for r in m['replicates'])})")
    lines.append(f"- **{BASELINE_LABEL}**: fitted on each fold's training generators")
    lines.append("")
    for gran in granularities:
        what = ("per generator (majority vote / mean over all its images)" if gran == "generator"
                else "per image")
        for title, family, metric in TABLES:
            tgts = FAMILIES[family]
            key = f"{metric}_{gran}"
            lines += [f"### {title}, {what}", "",
                      "| Method | " + " | ".join(t.title for t in tgts) + " | Avg. |",
                      "|---|" + "---|" * (len(tgts) + 1)]
            for m in rows:
                show_p = pvalues and m["label"] != BASELINE_LABEL
                lines.append(f"| {m['label']} | "
                             + " | ".join(_cell(m, t.name, key, show_p) for t in tgts)
                             + f" | {_mean_cell(m, f'{family}/{key}')} |")
            lines.append("")
    return "\n".join(lines)


def goal_markdown(g: Mapping) -> str:
    """One paragraph: the goal's three criteria and whether each is met."""
    c = g["criteria"]
    rgt = (f"{g['discrete_f1']:.3f} vs {g['random_gt_discrete_f1']:.3f} for {g['random_gt']} "
           f"(margin {g['margin']:+.3f}, needed {c['margin']:+.2f}): "
           f"{'met' if g['beats_random_gt'] else 'not met'}" if g["random_gt"] else
           "no Random G.T. runs to compare with")
    return "\n".join([
        f"**{g['method']}, generator level.** Mean discrete-architecture macro F1 {rgt}.",
        f"Attributes with p < {c['alpha']}: {len(g['significant'])} of 6 "
        f"({', '.join(g['significant']) or 'none'}; needed {c['min_significant']}): "
        f"{'met' if g['enough_significant'] else 'not met'}.",
        f"Mean L1 over the 9 counts {g['counts_l1']:.3f} vs {g['mean_predictor_counts_l1']:.3f} for the "
        f"mean predictor ({len(g['counts_better'])} of 9 counts better): "
        f"{'met' if g['beats_mean_predictor'] else 'not met'}.",
        f"Goal {'met' if g['met'] else 'not met'}.",
    ])


def plot_scores(report: Mapping, path: str | os.PathLike) -> Path:
    """One PNG: generator-level macro F1 per discrete attribute, flag and group for every method
    (Random G.T.: mean with its spread over seeds as an error bar), with the chance level (the
    permutation null's mean) of each method as a tick and the attributes with p < 0.01 starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tgts = [*targets.DISCRETE_TARGETS, *targets.GROUPS, *targets.FLAG_TARGETS]
    methods = report["methods"]
    x = np.arange(len(tgts))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(tgts) * max(len(methods), 1)), 4.2))
    for i, m in enumerate(methods):
        pos = x - 0.4 + width * (i + 0.5)
        f1 = np.array([m["targets"][t.name]["f1_generator"] for t in tgts])
        err = np.array([m["targets"][t.name].get("f1_generator_std", 0.0) for t in tgts])
        chance = np.array([m["targets"][t.name]["chance_generator"] for t in tgts])
        ax.bar(pos, f1, width, yerr=err if len(m["replicates"]) > 1 else None, label=m["label"])
        ax.scatter(pos, chance, marker="_", color="black", s=80, zorder=3,
                   label="chance (permutation mean)" if i == 0 else None)
        for j, t in enumerate(tgts):
            if m["targets"][t.name]["p_generator"] < 0.01:
                ax.text(pos[j], f1[j] + 0.02, "*", ha="center", fontsize=10)
    ax.set_xticks(x)
    ax.set_xticklabels([t.title for t in tgts], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("macro F1, held-out generators")
    ax.set_ylim(0, 1.08)
    ax.set_title(f"{report['dataset']}: {report['num_generators']} generators, "
                 f"{len(report['folds'])}-fold (* p < 0.01)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: Mapping, out: str | os.PathLike) -> dict[str, str]:
    """scores.md and scores.json in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(report, indent=1))
    (out / "scores.md").write_text(markdown(report))
    return {"scores_md": str(out / "scores.md"), "scores_json": str(out / "scores.json")}


__all__ = [
    "BASELINE_LABEL", "FAMILIES", "HeldOut", "N_RESAMPLES", "Permutation", "decision_counts", "goal",
    "goal_markdown", "l1_permutation_test", "macro_f1_from_confusion", "markdown", "mean_predictor",
    "plot_scores",
    "permutation_test", "pool", "score_held_out", "score_runs", "write_report",
]
