"""Robustness of parsing to perturbations of the input images (AdaParse Table XI's layout).

    python eval.py --workdir RUN --perturb rot90 hflip jpeg:75 noise:4 fgsm:2 denoise:0.05 --out DIR

For each run: the images of its split's test generators (decoded, uint8, as the cache holds them)
are parsed clean and after each perturbation (`adaparse_jax.perturb`, applied before
normalisation); each is scored against the true labels with `metrics.compute_metrics`, per image
and per generator (all its images: mean of continuous values, majority vote of class ids). The
table puts each perturbation's summary scores next to the clean ones (the change in brackets):
F1 averaged over the 3 loss groups, the 10 loss flags and the 6 discrete attributes, and L1 averaged
over the 9 continuous counts (lower is better); PSNR says how much the perturbation changed the
pixels. Per-attribute scores are in the JSON. Writes DIR/robustness.md and DIR/robustness.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adaparse_jax import metrics as metrics_lib
from adaparse_jax import perturb
from adaparse_jax.forensics import _run

BATCH_SIZE = 64
COLUMNS = (  # (metric key, title)
    ("f1/groups_mean", "Loss groups F1 avg"),
    ("f1/flags_mean", "Loss flags F1 avg"),
    ("f1/discrete_mean", "Discrete F1 avg"),
    ("l1/continuous_mean", "Continuous L1 avg (lower is better)"),
)
GRANULARITIES = (("", "per image"), ("generator_all/", "per generator (all its images)"))


def psnr(clean: np.ndarray, perturbed: np.ndarray) -> float | None:
    """PSNR in dB of the perturbed images against the clean ones (None when identical: infinite)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(clean, perturbed):
        return None
    return float(peak_signal_noise_ratio(clean, perturbed, data_range=255))


def evaluate_run(workdir: str | os.PathLike, specs: Sequence[str | perturb.Perturbation], *,
                 seed: int = 0, max_per_generator: int | None = None) -> dict:
    """One run's clean and perturbed scores on its test generators (see the module docstring)."""
    import jax

    perturbations = [p if isinstance(p, perturb.Perturbation) else perturb.parse_spec(p) for p in specs]
    run = _run.open_run(workdir)
    split = run.data.split
    images, generators = _run.generator_images(run, split.test, max_per_generator, seed)
    label_rows = _run.labels_of(run)[generators]
    attack = perturb.Attack(apply=run.apply, variables=run.variables,
                            class_weights=run.data.class_weights, loss_config=run.config.get("loss"),
                            batch_size=BATCH_SIZE)
    decide = jax.jit(lambda v, batch: metrics_lib.predictions_from_outputs(run.apply(v, batch["image"])))

    def scores(pixels: np.ndarray) -> dict:
        preds = _run.predict_arrays(decide, run.variables, pixels, BATCH_SIZE)
        return metrics_lib.compute_metrics(preds, label_rows, generators, images_per_generator=(None,),
                                           seed=seed)

    rows = [{"perturbation": "clean", "psnr": None, "metrics": scores(images)}]
    for p in perturbations:
        perturbed = p(images, seed=seed, attack=attack, label_rows=label_rows)
        rows.append({"perturbation": p.spec, "psnr": psnr(images, perturbed), "metrics": scores(perturbed)})
    return {"workdir": str(run.workdir), "arch": run.config.model.arch, "dataset": run.data.dataset.name,
            "split": str(run.config.split), "step": run.step, "test_generators": list(split.test),
            "num_images": int(len(images)), "seed": seed, "rows": rows}


def _cell(value: float, clean: float | None) -> str:
    return f"{value:.3f}" if clean is None else f"{value:.3f} ({value - clean:+.3f})"


def markdown(report: dict) -> str:
    parts = ["# Robustness to perturbations (Table XI layout)\n",
             "Cells: score after the perturbation (its change from clean). PSNR: of the perturbed test "
             "images against the clean ones.\n"]
    for r in report["runs"]:
        parts.append(f"## {r['arch']}, {r['dataset']} split {r['split']} (checkpoint step {r['step']})\n\n"
                     f"{r['workdir']}: {r['num_images']} images of {len(r['test_generators'])} test "
                     "generators.\n")
        clean = r["rows"][0]["metrics"]
        for prefix, title in GRANULARITIES:
            lines = [f"{title.capitalize()}:\n",
                     "| Perturbation | PSNR (dB) | " + " | ".join(t for _, t in COLUMNS) + " |",
                     "|---|---:|" + "---:|" * len(COLUMNS)]
            for row in r["rows"]:
                m = row["metrics"]
                psnr_text = "∞" if row["psnr"] is None else f"{row['psnr']:.1f}"
                lines.append(f"| {row['perturbation']} | {psnr_text} | "
                             + " | ".join(_cell(m[prefix + k], None if row is r["rows"][0] else clean[prefix + k])
                                        for k, _ in COLUMNS) + " |")
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def evaluate(workdirs: Sequence[str | os.PathLike], specs: Sequence[str], out: str | os.PathLike | None = None,
             *, seed: int = 0, max_per_generator: int | None = None) -> dict:
    """Every run's robustness table; writes OUT/robustness.md and OUT/robustness.json when `out` is given.

    The specs are all parsed before any run is loaded (a bad one raises `perturb.PerturbationError`).
    """
    from adaparse_jax import evaluation

    perturbations = perturb.parse_specs(specs)
    report = {"perturbations": [p.spec for p in perturbations],
              "runs": [evaluate_run(d, perturbations, seed=seed, max_per_generator=max_per_generator)
                       for d in evaluation.expand_workdirs(workdirs)]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report["files"] = {"markdown": str(out / "robustness.md"), "json": str(out / "robustness.json")}
        Path(report["files"]["markdown"]).write_text(markdown(report))
        Path(report["files"]["json"]).write_text(json.dumps(report, indent=1))
    return report
