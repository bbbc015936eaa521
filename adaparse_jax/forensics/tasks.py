"""Attribution, detection and same-source verification on a trained run's frozen features.

Which images play which part (G_train: the run's training generators; G_held: its validation and
test generators, never seen in training):

  attribute  closed set: a logistic regression (`sklearn`, standardised features) fitted on half of
             each G_train generator's images (`train_test_split`, stratified by generator, `seed`)
             names the generator of the other half: accuracy, balanced accuracy, confusion counts.
             Open set: its "unknown generator" score 1 - max class probability, images of G_held
             (positive) against the held-out half of G_train's (negative): ROC AUC.
  detect     real photographs (class 0) against generated images (class 1): a logistic regression
             fitted on the fit half of G_train's images and as many real images; scored on real
             images from photographs never fitted on and on the images of G_held (unseen
             generators; overall and per family), and on the other half of G_train's (seen
             generators). Accuracy (threshold 0.5) and ROC AUC of P(generated).
  pairs      every pair of G_held images: cosine similarity of their standardised features
             (scaler fitted on G_train's images), ROC AUC of same-generator pairs (positive)
             against different-generator pairs; overall and among the pairs inside each family.

Families come from the loss flags (`features.family_of`). Each command returns a JSON-able report
and writes OUT/<command>.md, .json and a ROC-curve PNG (`write`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax.forensics import _run
from adaparse_jax.forensics import features as features_lib

C = 1.0  # inverse L2 strength of the logistic regressions (scikit-learn's default)


# ------------------------------------------------------------------------------------------------
# Metrics (pure; NumPy and scikit-learn).


def unknown_score(probs: np.ndarray) -> np.ndarray:
    """Open-set score of each row of class probabilities [N, K]: 1 - max probability."""
    return 1.0 - np.asarray(probs).max(axis=1)


def roc_auc(y_true, score) -> float | None:
    """ROC AUC (`sklearn.metrics.roc_auc_score`), None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, score))


def closed_set(y_true, y_pred, classes: Sequence) -> dict:
    """Accuracy, balanced accuracy, chance (1/K) and confusion counts [true, predicted] over `classes`."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(classes))
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "chance": 1.0 / len(classes), "confusion": cm.tolist()}


def pair_similarities(embeddings: np.ndarray, generators: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair (i < j): (cosine similarity, same generator (bool), index pairs [P, 2])."""
    from sklearn.metrics.pairwise import cosine_similarity

    i, j = np.triu_indices(len(embeddings), k=1)
    sim = cosine_similarity(embeddings)[i, j]
    gens = np.asarray(generators)
    return sim, gens[i] == gens[j], np.stack([i, j], axis=1)


def binary_scores(y_true, score, threshold: float = 0.5) -> dict:
    """Accuracy at `threshold`, ROC AUC and the class counts of a binary problem (1 = positive)."""
    from sklearn.metrics import accuracy_score

    y, s = np.asarray(y_true), np.asarray(score)
    return {"accuracy": float(accuracy_score(y, s >= threshold)), "auc": roc_auc(y, s),
            "positives": int(y.sum()), "negatives": int((1 - y).sum())}


def _classifier(seed: int, balanced: bool = False):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(
        C=C, max_iter=5000, random_state=seed, class_weight="balanced" if balanced else None))


# ------------------------------------------------------------------------------------------------
# Data of the three tasks.


class _Context:
    """A run, its feature extractor, and its generator images split as the module docstring says."""

    def __init__(self, workdir, feature_set: str, seed: int, max_per_generator: int | None):
        from sklearn.model_selection import train_test_split

        self.run = _run.open_run(workdir)
        self.features = features_lib.Features(self.run, feature_set)
        self.seed = seed
        split = self.run.data.split
        self.known = list(split.train)
        self.held = list(split.val) + list(split.test)
        self.names = list(self.run.data.dataset.names)
        self.info = features_lib.generator_info(self.run, self.known + self.held)
        images, gens = _run.generator_images(self.run, self.known, max_per_generator, seed)
        x = self.features(images)
        self.fit_x, self.test_x, self.fit_g, self.test_g = train_test_split(
            x, gens, test_size=0.5, stratify=gens, random_state=seed)
        if self.held:
            held_images, self.held_g = _run.generator_images(self.run, self.held, max_per_generator, seed)
            self.held_x = self.features(held_images)
        else:
            self.held_x, self.held_g = np.zeros((0, x.shape[1]), np.float32), np.zeros((0,), np.int64)

    def header(self, command: str) -> dict:
        cfg = self.run.config
        return {"command": command, "workdir": str(self.run.workdir), "step": self.run.step,
                "arch": cfg.model.arch, "dataset": self.run.data.dataset.name, "split": str(cfg.split),
                "features": self.features.feature_set, "feature_dim": int(self.fit_x.shape[1]),
                "seed": self.seed, "training_generators": self.known, "held_out_generators": self.held,
                "generators": self.info}

    def name(self, row: int) -> str:
        return self.names[int(row)]


def _attribute(ctx: _Context) -> dict:
    clf = _classifier(ctx.seed).fit(ctx.fit_x, ctx.fit_g)
    classes = list(clf.classes_)
    closed = closed_set(ctx.test_g, clf.predict(ctx.test_x), classes)
    cm = np.asarray(closed["confusion"])
    per_generator = {}
    for k, g in enumerate(classes):
        off = cm[k].copy()
        off[k] = -1
        worst = int(np.argmax(off))
        per_generator[ctx.name(g)] = {"images": int(cm[k].sum()), "correct": int(cm[k, k]),
                                      "recall": float(cm[k, k] / max(cm[k].sum(), 1)),
                                      "most_confused_with": ctx.name(classes[worst]) if off[worst] > 0 else None}
    report = {**ctx.header("attribute"), "fit_images": int(len(ctx.fit_g)),
              "test_images": int(len(ctx.test_g)),
              "closed_set": {**closed, "classes": [ctx.name(g) for g in classes],
                             "per_generator": per_generator}}
    known_score = unknown_score(clf.predict_proba(ctx.test_x))
    if len(ctx.held_g):
        held_score = unknown_score(clf.predict_proba(ctx.held_x))
        y = np.r_[np.zeros(len(known_score)), np.ones(len(held_score))]
        s = np.r_[known_score, held_score]
        report["open_set"] = {"score": "1 - max class probability", "auc": roc_auc(y, s),
                              "known_images": int(len(known_score)), "unknown_images": int(len(held_score)),
                              "mean_score_known": float(known_score.mean()),
                              "mean_score_unknown": float(held_score.mean())}
        report["_curves"] = {"open set: held-out generators vs known": (y, s)}
    else:
        report["open_set"] = None
    return report


def _detect(ctx: _Context, real: str | os.PathLike | None) -> dict:
    size = ctx.run.image_size
    n_test = len(ctx.held_g) or len(ctx.test_g)
    if real is None:
        real_fit, real_test, real_info = features_lib.photograph_crops(len(ctx.fit_g), n_test, size, ctx.seed)
    else:
        real_fit, real_test, real_info = features_lib.folder_images(real, size)
    rf, rt = ctx.features(real_fit), ctx.features(real_test)
    clf = _classifier(ctx.seed, balanced=True).fit(np.r_[ctx.fit_x, rf],
                                                   np.r_[np.ones(len(ctx.fit_x)), np.zeros(len(rf))])
    p_real = clf.predict_proba(rt)[:, 1]
    rows, curves = {}, {}

    def add(label: str, x: np.ndarray, family: str | None = None):
        p = clf.predict_proba(x)[:, 1]
        y = np.r_[np.zeros(len(p_real)), np.ones(len(p))]
        s = np.r_[p_real, p]
        rows[label] = {**binary_scores(y, s), "family": family}
        curves[label] = (y, s)

    if len(ctx.held_g):
        add("unseen generators (held out)", ctx.held_x)
        for fam, mask in features_lib.family_groups(ctx.info, ctx.held_g, ctx.names).items():
            add(f"unseen, {fam}", ctx.held_x[mask], fam)
    add("seen generators (other images)", ctx.test_x)
    return {**ctx.header("detect"), "real": {**real_info, "fit_images": int(len(rf)),
                                             "test_images": int(len(rt))},
            "fit_generated_images": int(len(ctx.fit_x)), "rows": rows, "_curves": curves}


def _pairs(ctx: _Context) -> dict:
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(ctx.held_g)) < 2:
        raise ValueError(f"pairs: the run {ctx.run.workdir} holds out {len(np.unique(ctx.held_g))} "
                         "generator(s); same-source verification needs at least 2")
    scaler = StandardScaler().fit(np.r_[ctx.fit_x, ctx.test_x])
    emb = scaler.transform(ctx.held_x)
    sim, same, idx = pair_similarities(emb, ctx.held_g)
    rows, curves = {}, {}

    def add(label: str, mask: np.ndarray, family: str | None, generators: int):
        y = same[mask].astype(np.int64)
        rows[label] = {"auc": roc_auc(y, sim[mask]), "same_pairs": int(y.sum()),
                       "different_pairs": int((1 - y).sum()), "generators": generators,
                       "mean_similarity_same": float(sim[mask][y == 1].mean()) if y.any() else None,
                       "mean_similarity_different": float(sim[mask][y == 0].mean()) if (1 - y).any() else None,
                       "family": family}
        if rows[label]["auc"] is not None:
            curves[label] = (y, sim[mask])

    add("all held-out generators", np.ones(len(sim), bool), None, len(np.unique(ctx.held_g)))
    for fam, mask in features_lib.family_groups(ctx.info, ctx.held_g, ctx.names).items():
        pair_mask = mask[idx[:, 0]] & mask[idx[:, 1]]
        add(f"within {fam}", pair_mask, fam, len(np.unique(ctx.held_g[mask])))
    return {**ctx.header("pairs"), "similarity": "cosine of standardised features", "rows": rows,
            "_curves": curves}


# ------------------------------------------------------------------------------------------------
# Reports.


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(report: Mapping) -> str:
    head = (f"run {report['workdir']} ({report['arch']}, {report['dataset']} split {report['split']}, "
            f"checkpoint step {report['step']}); features: {report['features']} "
            f"({report['feature_dim']} per image); seed {report['seed']}")
    cmd = report["command"]
    if cmd == "attribute":
        cs = report["closed_set"]
        lines = [f"# Generator attribution\n\n{head}\n",
                 f"Closed set ({len(cs['classes'])} training generators; fitted on {report['fit_images']} "
                 f"images, tested on their other {report['test_images']}):\n",
                 "| accuracy | balanced accuracy | chance |", "|---:|---:|---:|",
                 f"| {_f(cs['accuracy'])} | {_f(cs['balanced_accuracy'])} | {_f(cs['chance'])} |", "",
                 "| generator | family | images | recall | most confused with |", "|---|---|---:|---:|---|"]
        lines += [f"| {n} | {report['generators'][n]['family']} | {r['images']} | {_f(r['recall'])} | "
                  f"{r['most_confused_with'] or ''} |" for n, r in cs["per_generator"].items()]
        o = report["open_set"]
        if o is None:
            lines += ["", "Open set: the run holds out no generator."]
        else:
            lines += ["", f"Open set (score {o['score']}; {o['unknown_images']} images of "
                      f"{len(report['held_out_generators'])} held-out generators vs {o['known_images']} "
                      "held-out images of the training generators):\n",
                      "| ROC AUC | mean score, known | mean score, unknown |", "|---:|---:|---:|",
                      f"| {_f(o['auc'])} | {_f(o['mean_score_known'])} | {_f(o['mean_score_unknown'])} |"]
        return "\n".join(lines) + "\n"
    if cmd == "detect":
        r = report["real"]
        lines = [f"# Real vs generated\n\n{head}\n",
                 f"Real images: {r['source']} ({r['fit_images']} fitted, {r['test_images']} tested, "
                 f"from different photographs or files); generated: fitted on "
                 f"{report['fit_generated_images']} images of the training generators.\n",
                 "| generated images tested | accuracy | ROC AUC | generated | real |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {_f(v['accuracy'])} | {_f(v['auc'])} | {v['positives']} | {v['negatives']} |"
                  for k, v in report["rows"].items()]
        return "\n".join(lines) + "\n"
    lines = [f"# Same-source verification\n\n{head}\n",
             f"Pairs of images of the {len(report['held_out_generators'])} held-out generators; "
             f"similarity: {report['similarity']}; positive = same generator.\n",
             "| pairs | generators | ROC AUC | same pairs | different pairs | mean sim. same | "
             "mean sim. different |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['generators']} | {_f(v['auc'])} | {v['same_pairs']} | {v['different_pairs']} | "
              f"{_f(v['mean_similarity_same'])} | {_f(v['mean_similarity_different'])} |"
              for k, v in report["rows"].items()]
    return "\n".join(lines) + "\n"


def plot_roc(curves: Mapping[str, tuple], title: str, path: str | os.PathLike) -> Path:
    """ROC curves (`sklearn.metrics.RocCurveDisplay`) of {label: (y_true, score)} into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, s) in curves.items():
        if len(np.unique(y)) == 2:
            RocCurveDisplay.from_predictions(y, s, name=label, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance (AUC = 0.5)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_TITLES = {"attribute": "Open-set attribution: unknown-generator score",
           "detect": "Real vs generated: P(generated)", "pairs": "Same-source verification: cosine"}


def write(report: dict, out: str | os.PathLike) -> dict[str, str]:
    """OUT/<command>.md, .json and _roc.png (attribute: also the confusion matrix PNG)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = report["command"]
    curves = report.pop("_curves", {})
    files = {"markdown": out / f"{cmd}.md", "json": out / f"{cmd}.json"}
    files["markdown"].write_text(markdown(report))
    if curves:
        files["roc"] = plot_roc(curves, f"{_TITLES[cmd]}\n{report['dataset']} split {report['split']}, "
                                f"{report['arch']}, features: {report['features']}", out / f"{cmd}_roc.png")
    if cmd == "attribute":
        files["confusion"] = _plot_confusion(report, out / "attribute_confusion.png")
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=1))
    return report["files"]


def _plot_confusion(report: Mapping, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    cs = report["closed_set"]
    k = len(cs["classes"])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * k + 2), max(4, 0.35 * k + 2)))
    ConfusionMatrixDisplay(np.asarray(cs["confusion"]), display_labels=cs["classes"]).plot(
        ax=ax, include_values=k <= 16, xticks_rotation="vertical", colorbar=False)
    ax.set_title(f"Closed-set attribution (accuracy {cs['accuracy']:.3f}, chance {cs['chance']:.3f})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COMMANDS = ("attribute", "detect", "pairs")


def run_command(command: str, workdir, out, *, feature_set: str = "both", seed: int = 0,
                max_per_generator: int | None = None, real: str | os.PathLike | None = None) -> dict:
    """Run one forensics command on a training run and write its report into `out`."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
    if real is not None and command != "detect":
        raise ValueError("--real applies to detect only")
    if real is not None and not Path(real).is_dir():
        raise FileNotFoundError(f"--real {real}: not a directory")
    ctx = _Context(workdir, feature_set, seed, max_per_generator)
    report = {"attribute": lambda: _attribute(ctx), "detect": lambda: _detect(ctx, real),
              "pairs": lambda: _pairs(ctx)}[command]()
    write(report, out)
    return report
