"""The four sections on a subject's sample (`diagnose`), as Markdown and JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from adaparse_jax import losses, targets
from adaparse_jax.diagnose.activations import activation_pass
from adaparse_jax.diagnose.gradients import (
    ALL,
    CONSTRAINTS,
    CROSS_ENTROPIES,
    TOTAL,
    adam_step_ratio,
    group_names,
    group_of,
    term_gradients,
)
from adaparse_jax.diagnose.probe import fingerprint_probe
from adaparse_jax.diagnose.subject import Subject, batches_of, flat, loss_fn, sample_records

MARKDOWN = "diagnose.md"
JSON = "diagnose.json"


def diagnose(subject: Subject, *, images: int = 64, seed: int = 0) -> dict:
    """The four sections on `images` training images of `subject` (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = subject.config
    data = subject.data
    records = sample_records(data, images, seed)
    batches = batches_of(data, records, cfg.batch_size)
    used = records[:sum(int(b["image"].shape[0]) for b in batches)]
    gens = data.cache.generator[used]

    grads = term_gradients(loss_fn(subject), subject.params, subject.batch_stats, batches,
                           step=subject.step, seed=seed)
    groups = group_names(subject.params)
    counts = {g: 0 for g in groups}
    for path, leaf in flat(subject.params).items():
        counts[group_of(path)] += int(np.prod(leaf.shape))

    if subject.opt_state is None:
        adam = {"available": False, "reason": "fresh initialisation: Adam has no second moments yet"}
    else:
        adam = {"available": True, **adam_step_ratio(grads["ce_sq"], subject.opt_state,
                                                     b2=cfg.optimizer.b2, eps=cfg.optimizer.eps)}

    arch = cfg.model.arch
    heads = [targets.head_index(t.name) for t in targets.DISCRETE_TARGETS] if arch == "adaparse" else None
    acts = activation_pass(subject.model, subject.params, subject.batch_stats, batches, seed=seed,
                           fingerprint_heads=heads)
    probe = fingerprint_probe(data.cache.read(used), acts["fingerprints"], gens,
                              np.asarray(data.dataset.labels)[gens], seed=seed)

    factor = float(losses.constraint_factor(subject.step, loss_config=cfg.loss))
    norms = grads["norms"]
    ratio = {g: (norms[CONSTRAINTS][g] / norms[CROSS_ENTROPIES][g]
                 if norms[CROSS_ENTROPIES][g] > 0 else None) for g in [*groups, ALL]}
    return {
        "source": {**subject.source, "arch": arch, "step": subject.step,
                   "dataset": data.dataset.name, "split": str(cfg.split),
                   "images": int(len(used)), "generators": int(len(np.unique(gens))),
                   "batch_size": int(batches[0]["image"].shape[0]), "seed": seed,
                   "random_gt": bool(cfg.random_gt), "constraint_factor": factor,
                   "optimizer": {k: cfg.optimizer[k] for k in cfg.optimizer},
                   "seconds": round(time.perf_counter() - t0, 1)},
        "groups": groups,
        "parameters": counts,
        "terms": grads["values"],
        "gradients": norms,
        "constraint_to_ce_ratio": ratio,
        "adam": adam,
        "activations": acts["layers"],
        "fingerprint_rms": acts["fingerprint_rms"],
        "input_rms": acts["input_rms"],
        "probe": probe,
    }


def _num(v, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: Mapping) -> str:
    """The report as Markdown (the tables of diagnose.md)."""
    s = report["source"]
    groups = report["groups"]
    where = (f"`{s['workdir']}` checkpoint {s['checkpoint']} ({s['checkpoint_choice']})"
             if "workdir" in s else f"fresh initialisation (seed {s['seed']}) on `{s['dataset']}`")
    opt = s["optimizer"]
    lines = [
        f"# Diagnosis: {s['arch']} at step {s['step']}",
        "",
        f"{where}; {s['images']} training images of {s['generators']} generators ({s['dataset']}, "
        f"split {s['split']}{', Random G.T. labels' if s['random_gt'] else ''}), batches of "
        f"{s['batch_size']}, seed {s['seed']}; constraint weights x {s['constraint_factor']:.3g} at "
        f"this step; optimizer " + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                             for k, v in opt.items())
        + f" ({s['seconds']} s).",
        "",
        "## Loss terms and gradient norms per parameter group",
        "",
        "Gradient of the mean over the sample's batches (BatchNorm in training mode, as in a step).",
        "",
        "| term | value | " + " | ".join(groups) + f" | {ALL} |",
        "|---|---:|" + "---:|" * (len(groups) + 1),
        "| (parameters) | | " + " | ".join(f"{report['parameters'][g]:,}" for g in groups) + f" | "
        f"{sum(report['parameters'].values()):,} |",
    ]
    grad, terms = report["gradients"], report["terms"]
    summary = (CONSTRAINTS, CROSS_ENTROPIES, TOTAL)
    for name in [n for n in grad if n not in summary] + list(summary):
        value = "" if name in (CONSTRAINTS, CROSS_ENTROPIES) else _num(terms.get(name), ".4g")
        label = f"**{name}**" if name in summary else name
        lines.append(f"| {label} | {value} | " + " | ".join(_num(grad[name][g], ".2e") for g in groups)
                     + f" | {_num(grad[name][ALL], '.2e')} |")
    ratio = report["constraint_to_ce_ratio"]
    lines.append("| **constraints / cross-entropies** | | "
                 + " | ".join(_num(ratio[g], ".3g") for g in groups) + f" | {_num(ratio[ALL], '.3g')} |")
    lines += ["", "## Adam's effective step ratio of the cross-entropies", ""]
    adam = report["adam"]
    if not adam["available"]:
        lines.append(f"Not available: {adam['reason']}.")
    else:
        lines += [
            f"Per parameter: RMS over batches of the cross-entropies' gradient / (sqrt(v_hat) + eps), "
            f"Adam step {adam['count']}. 1: those losses move the parameter about the learning rate "
            "per step; 0.01: 100x less.",
            "",
            "| group | parameters | 10 % | median | 90 % |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {g} | {r['parameters']:,} | {r['q10']:.3g} | {r['median']:.3g} | {r['q90']:.3g} |"
                  for g, r in adam["groups"].items()]
    lines += [
        "", "## Activations (training-mode pass over the sample)", "",
        "dead / always on: fraction of a ReLU layer's units (channels) never / always active on any "
        "image and position; spread: image-dependent std / |mean| (RMS over elements, after the "
        "ReLU); std: that RMS std (for a head: its logits' variation across images).",
        "",
        "| layer | units | dead | always on | spread | std |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, a in report["activations"].items():
        dead = (f"{a['dead']:.2f} | {a['always_on']:.2f}" if a["kind"] == "relu" else " | ")
        lines.append(f"| {path} | {a['units']} | {dead} | {_num(a['spread'])} | {a['std']:.3g} |")
    lines += [
        "", "## Probe: spectral features of images vs fingerprints", "",
        f"Logistic regression on `zoo.probe.spectral_features`, grouped k-fold by generator over the "
        f"sample, held-out macro F1 per image. Fingerprint RMS {report['fingerprint_rms']:.3g} "
        f"(input, normalised: {report['input_rms']:.3g}).",
        "",
        "| attribute | classes | generators | images F1 | fingerprint F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["probe"].items():
        lines.append(f"| {targets.BY_NAME[name].title} | {r['classes']} | {r['generators']} | "
                     f"{_num(r['image'], '.3f')} | {_num(r['fingerprint'], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: str | os.PathLike, *, render=None,
                 names: tuple[str, str] = (MARKDOWN, JSON)) -> dict[str, str]:
    """Write `render(report)` (default `markdown`) and the report as JSON into `out` under `names`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / names[0], "json": out / names[1]}
    paths["markdown"].write_text((render or markdown)(report))
    paths["json"].write_text(json.dumps(report, indent=1))
    return {k: str(v) for k, v in paths.items()}

