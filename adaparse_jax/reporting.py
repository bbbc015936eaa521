"""Write an evaluation report: Markdown tables like the AdaParse paper's, JSON, confusion PNGs.

Tables (one set per granularity: per image, then per generator with N = 1, 10, 100, all images),
one row per method plus the mean/mode baseline, cells "mean ± std" over splits:

  Table II    loss-function flags (the 10 flags): macro F1, then accuracy
  (groups)    the 3 coarse loss groups: macro F1, then accuracy
  Table III   discrete architecture (6 targets): macro F1, then accuracy
  Table IV    continuous architecture (9 counts): L1 error (lower is better)

Every column list comes from `targets`; the numbers come from `evaluation.evaluate` unchanged (the
JSON holds them at full precision, the tables round to 3 decimals).

The held-out scores of `scoring.score_runs` render here too (`scores_markdown`, `goal_markdown`,
`plot_scores`, `write_scores`): the statistics live in `stats` and `scoring`, never in a renderer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import atomic, targets
from adaparse_jax.runs import BASELINE_LABEL
from adaparse_jax.stats import FAMILIES

# (title, targets, metric, family mean key)
TABLES = (
    ("Table II: loss-function flags, macro F1", targets.FLAG_TARGETS, "f1", "flags_mean"),
    ("Table II: loss-function flags, accuracy", targets.FLAG_TARGETS, "acc", "flags_mean"),
    ("Coarse loss groups, macro F1", targets.GROUPS, "f1", "groups_mean"),
    ("Coarse loss groups, accuracy", targets.GROUPS, "acc", "groups_mean"),
    ("Table III: discrete architecture, macro F1", targets.DISCRETE_TARGETS, "f1", "discrete_mean"),
    ("Table III: discrete architecture, accuracy", targets.DISCRETE_TARGETS, "acc", "discrete_mean"),
    ("Table IV: continuous architecture, L1 error (lower is better)", targets.CONTINUOUS_TARGETS, "l1",
     "continuous_mean"),
)


def granularities(images_per_generator: Sequence) -> list[tuple[str, str]]:
    """(metric-name prefix, heading) of every granularity of a report."""
    out = [("", "Per image")]
    for n in images_per_generator:
        if n in (None, "all"):
            out.append(("generator_all/", "Per generator, all images of each"))
        else:
            out.append((f"generator_n{n}/", f"Per generator, N = {n} images of each"))
    return out


def cell(mean: Mapping, std: Mapping, key: str, num_splits: int) -> str:
    """'0.812 ± 0.010' (or '0.812' for a single split); '–' where the metric is absent."""
    if key not in mean:
        return "–"
    return f"{mean[key]:.3f}" if num_splits == 1 else f"{mean[key]:.3f} ± {std[key]:.3f}"


def _rows(report: Mapping) -> list[Mapping]:
    return [*report["methods"], report["baseline"]]


def markdown(report: Mapping) -> str:
    """The Markdown tables of a report (see the module docstring)."""
    lines = ["# Model parsing on " + ", ".join(report["datasets"]), ""]
    for m in _rows(report):
        where = ", ".join(f"split {s}" + (f" (step {st}, {sel})" if st is not None else "")
                          for s, st, sel in zip(m["splits"], m.get("steps", [None] * len(m["splits"])),
                                                m.get("selection", [""] * len(m["splits"]))))
        lines.append(f"- **{m['label']}**: {where}")
    lines += ["", f"Cells: mean ± {report['std']}; 3 decimals (results.json holds every number). "
              "Macro F1 with zero_division=0. Per-generator rows aggregate N images of each test "
              "generator (mean of continuous values, majority vote of classes), drawn with seed "
              f"{report['aggregation_seed']}.", ""]
    for prefix, heading in granularities(report["images_per_generator"]):
        lines += [f"## {heading}", ""]
        for title, tgts, metric, family in TABLES:
            cols = [t.title for t in tgts] + ["Avg."]
            keys = [f"{prefix}{metric}/{t.name}" for t in tgts] + [f"{prefix}{metric}/{family}"]
            lines += [f"### {title}", "", "| Method | " + " | ".join(cols) + " |",
                      "|---|" + "---|" * len(cols)]
            for m in _rows(report):
                n = len(m["splits"])
                lines.append(f"| {m['label']} | " + " | ".join(cell(m["mean"], m["std"], k, n)
                                                           for k in keys) + " |")
            lines.append("")
    return "\n".join(lines)


def parse_cell(text: str) -> tuple[float, float | None]:
    """Inverse of `cell`: (mean, std or None)."""
    m = re.fullmatch(r"\s*(-?[0-9.]+)(?:\s*±\s*([0-9.]+))?\s*", text)
    if m is None:
        raise ValueError(f"not a table cell: {text!r}")
    return float(m.group(1)), (float(m.group(2)) if m.group(2) is not None else None)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower() or "run"


def plot_confusion(confusion: Mapping[str, Sequence[Sequence[int]]], title: str,
                   path: str | os.PathLike) -> None:
    """One PNG with a confusion matrix (counts, rows = true class) per discrete target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t for t in targets.DISCRETE_TARGETS if t.name in confusion]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, t in zip(axes[0], names):
        counts = np.asarray(confusion[t.name])
        ax.imshow(counts, cmap="Blues")
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8,
                    color="white" if v > counts.max() / 2 else "black")
        ax.set_title(t.title, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(t.num_classes))
        ax.set_yticks(range(t.num_classes))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Mapping, out: str | os.PathLike) -> dict[str, str]:
    """Write tables.md, results.json and confusion_<label>.png into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tables": str(out / "tables.md"), "json": str(out / "results.json")}
    for m in _rows(report):
        path = out / f"confusion_{_slug(m['label'])}.png"
        plot_confusion(m["confusion"], f"{m['label']}: test generators, splits "
                       + ", ".join(m["splits"]), path)
        files[f"confusion/{m['label']}"] = str(path)
    atomic.write_text(out / "tables.md", markdown(report))
    atomic.write_json(out / "results.json", {**report, "files": files})
    return files


# ------------------------------------------------------------------------------------------------
# Held-out scores (scoring.score_runs).


def _p(p: float) -> str:
    return f"p={p:.4f}" if p >= 1e-4 else f"p={p:.1e}"


def _score_cell(m: Mapping, name: str, key: str, pvalues: bool) -> str:
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


SCORE_TABLES = (
    ("Table II: loss-function flags, macro F1", "flags", "f1"),
    ("Coarse loss groups, macro F1", "groups", "f1"),
    ("Table III: discrete architecture, macro F1", "discrete", "f1"),
    ("Table IV: continuous architecture, L1 error (lower is better)", "continuous", "l1"),
)


PROBE_LABEL = "Spectral probe (reference)"


def _probe_row(probe: Mapping, tgts) -> str:
    """The discrete table's row of `zoo.probe.probe` results (generator level, pooled held-out)."""
    cells = [f"{probe[t.name]['f1']:.3f} ({_p(probe[t.name]['p'])})" if t.name in probe else "–"
             for t in tgts]
    f1s = [probe[t.name]["f1"] for t in tgts if t.name in probe]
    return f"| {PROBE_LABEL} | " + " | ".join(cells) + f" | {sum(f1s) / max(len(f1s), 1):.3f} |"


def scores_markdown(report: Mapping, *, granularities: Sequence[str] = ("generator", "image"),
             pvalues: bool = True, probe: Mapping | None = None) -> str:
    """The tables of a `score_runs` report (see the module docstring for every definition).

    probe: `zoo.probe.probe` results of the same zoo, shown as a reference row of the
    generator-level discrete table (logistic regression on spectra; not a parsing network).
    """
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
        for title, family, metric in SCORE_TABLES:
            tgts = FAMILIES[family]
            key = f"{metric}_{gran}"
            lines += [f"### {title}, {what}", "",
                      "| Method | " + " | ".join(t.title for t in tgts) + " | Avg. |",
                      "|---|" + "---|" * (len(tgts) + 1)]
            for m in rows:
                show_p = pvalues and m["label"] != BASELINE_LABEL
                lines.append(f"| {m['label']} | "
                             + " | ".join(_score_cell(m, t.name, key, show_p) for t in tgts)
                             + f" | {_mean_cell(m, f'{family}/{key}')} |")
            if probe and family == "discrete" and gran == "generator":
                lines.append(_probe_row(probe, tgts))
            lines.append("")
    return "\n".join(lines)


def goal_markdown(g: Mapping) -> str:
    """One paragraph: the goal's three criteria and whether each is met."""
    c = g["criteria"]
    rgt = (f"{g['discrete_f1']:.3f} vs {g['random_gt_discrete_f1']:.3f} for {g['random_gt']} "
           f"(margin {g['margin']:+.3f}, needed {c['margin']:+.2f}): "
           f"{'met' if g['beats_random_gt'] else 'not met'}" if g["random_gt"] else
           "no Random G.T. runs to compare with")
    lines = [
        f"**{g['method']}, generator level.** Mean discrete-architecture macro F1 {rgt}.",
        f"Attributes with p < {c['alpha']}: {len(g['significant'])} of 6 "
        f"({', '.join(g['significant']) or 'none'}; needed {c['min_significant']}): "
        f"{'met' if g['enough_significant'] else 'not met'}."]
    if c.get("with_counts", True):
        lines.append(f"Mean L1 over the 9 counts {g['counts_l1']:.3f} vs {g['mean_predictor_counts_l1']:.3f} "
                     f"for the mean predictor ({len(g['counts_better'])} of 9 counts better): "
                     f"{'met' if g['beats_mean_predictor'] else 'not met'}.")
    if "probe_read" in g:
        needed = min(c["min_probe_reached"], len(g["probe_read"]))
        lines.append(f"At least the spectral probe on {len(g['probe_reached'])} of the {len(g['probe_read'])} "
                     f"attributes it reads at p < {c['alpha']} ({', '.join(g['probe_reached']) or 'none'}; "
                     f"needed {needed}): {'met' if g['reaches_probe'] else 'not met'}.")
    lines.append(f"Goal {'met' if g['met'] else 'not met'}.")
    return "\n".join(lines)


def probe_goal_line(g: Mapping) -> str:
    """One line: `scoring.probe_goal`'s verdict for one method, with the criteria that failed."""
    failed = [k for k, ok in g["checks"].items() if not ok]
    return (f"{g['method']}: Goal {'met' if g['met'] else 'not met'}"
            + (f" (failed: {'; '.join(g['why'][k] for k in failed)})" if failed else
               f" (up-sampling {g['upsampling']:.3f}; discrete {g['discrete_f1']:.3f} vs "
               f"{g['random_gt_discrete_f1']:.3f} Random G.T.)"))


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


def write_scores(report: Mapping, out: str | os.PathLike) -> dict[str, str]:
    """scores.md and scores.json of a `scoring.score_runs` report in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "scores.json", report)
    atomic.write_text(out / "scores.md", scores_markdown(report))
    return {"scores_md": str(out / "scores.md"), "scores_json": str(out / "scores.json")}
