"""Write an evaluation report: Markdown tables like the AdaParse paper's, JSON, confusion PNGs.

Tables (one set per granularity: per image, then per generator with N = 1, 10, 100, all images),
one row per method plus the mean/mode baseline, cells "mean ± std" over splits:

  Table II    loss-function flags (the 10 flags): macro F1, then accuracy
  (groups)    the 3 coarse loss groups: macro F1, then accuracy
  Table III   discrete architecture (6 targets): macro F1, then accuracy
  Table IV    continuous architecture (9 counts): L1 error (lower is better)

Every column list comes from `targets`; the numbers come from `evaluation.evaluate` unchanged (the
JSON holds them at full precision, the tables round to 3 decimals).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import targets

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
    (out / "tables.md").write_text(markdown(report))
    (out / "results.json").write_text(json.dumps({**report, "files": files}, indent=1))
    return files
