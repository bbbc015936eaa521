"""eval.py and parse on the tiny runs of train_runs.py: the tables' numbers equal a recomputation
with scikit-learn from the saved per-image predictions; clear errors; parse == evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from train_runs import ROOT, tiny_runs

from adaparse_jax import evaluation, reporting, targets
from adaparse_jax.data import re116
from adaparse_jax.parse import parse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def report(runs):
    out = runs["root"] / "report"
    done = subprocess.run([sys.executable, "eval.py", "--workdir", str(runs["root"] / "[AC]"), "--out",
                           str(out)], cwd=ROOT, env=runs["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Table II: loss-function flags, macro F1" in done.stdout
    return {"out": out, "json": json.loads((out / "results.json").read_text()),
            "tables": _parse_tables((out / "tables.md").read_text())}


def _parse_tables(text: str) -> dict:
    """{(section heading, table title): {row label: [cells]}} of tables.md."""
    tables, section, title = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("### "):
            title = line[4:]
            tables[(section, title)] = {}
        elif line.startswith("| ") and title and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables[(section, title)][cells[0]] = cells[1:]
    return tables


def _majority(y, k):
    return int(np.argmax(np.bincount(y, minlength=k)))


def _recompute(npz, prefix: str, baseline_rows=None) -> dict:
    """Metrics of one split's saved predictions with scikit-learn (per image or per generator, all)."""
    rows = npz["label_rows"]
    labels = targets.split_labels(rows)
    gens = npz["generator"]
    if baseline_rows is not None:  # the mean/mode baseline's constant predictions
        base = targets.split_labels(baseline_rows)
        # float32, as model outputs are (and as metrics.mean_mode_baseline stores them)
        mean = base["continuous"].astype(np.float64).mean(0).astype(np.float32).astype(np.float64)
        preds = {"continuous": np.tile(mean, (len(rows), 1))}
        for t in targets.CLASSIFICATION_TARGETS:
            preds[t.name] = np.full(len(rows), _majority(base[t.name], t.num_classes))
    else:
        preds = {"continuous": npz["continuous"].astype(np.float64),
                 **{t.name: npz[t.name] for t in targets.CLASSIFICATION_TARGETS}}
    if prefix == "generator_all/":
        ids = np.unique(gens)
        labels = {k: np.stack([v[gens == g][0] for g in ids]) for k, v in labels.items()}
        preds = {"continuous": np.stack([preds["continuous"][gens == g].mean(0) for g in ids]),
                 **{t.name: np.array([_majority(preds[t.name][gens == g], t.num_classes) for g in ids])
                    for t in targets.CLASSIFICATION_TARGETS}}
    out = {}
    err = np.abs(preds["continuous"] - labels["continuous"].astype(np.float64)).mean(0)
    for t, e in zip(targets.CONTINUOUS_TARGETS, err):
        out[f"l1/{t.name}"] = e
    out["l1/continuous_mean"] = err.mean()
    for t in targets.CLASSIFICATION_TARGETS:
        out[f"f1/{t.name}"] = f1_score(labels[t.name], preds[t.name], average="macro", zero_division=0)
        out[f"acc/{t.name}"] = accuracy_score(labels[t.name], preds[t.name])
    for family, members in (("flags", targets.FLAG_TARGETS), ("discrete", targets.DISCRETE_TARGETS),
                            ("groups", targets.GROUPS)):
        for metric in ("f1", "acc"):
            out[f"{metric}/{family}_mean"] = np.mean([out[f"{metric}/{t.name}"] for t in members])
    return out


def _check_row(report, label, per_split: list[dict], prefix: str, section: str):
    """JSON mean/std and the Markdown cells of one table row equal the recomputed numbers."""
    entry = next(m for m in report["json"]["methods"] + [report["json"]["baseline"]] if m["label"] == label)
    for key in per_split[0]:
        values = [p[key] for p in per_split]
        assert entry["mean"][prefix + key] == pytest.approx(np.mean(values), abs=1e-9), key
        assert entry["std"][prefix + key] == pytest.approx(np.std(values), abs=1e-9), key
    for title, tgts, metric, family in reporting.TABLES:
        cells = report["tables"][(section, title)][label]
        keys = [f"{metric}/{t.name}" for t in tgts] + [f"{metric}/{family}"]
        assert len(cells) == len(keys)
        for c, key in zip(cells, keys):
            mean, std = reporting.parse_cell(c)
            values = [p[key] for p in per_split]
            assert mean == pytest.approx(round(np.mean(values), 3), abs=1.001e-3 / 2), (title, key)
            assert std == pytest.approx(round(np.std(values), 3), abs=1.001e-3 / 2), (title, key)


def test_tables_equal_a_sklearn_recomputation_from_saved_predictions(report, runs):
    method = report["json"]["methods"]
    assert [m["label"] for m in method] == ["RE-Net"] and method[0]["splits"] == ["1", "2"]
    npzs = [np.load(p) for p in method[0]["predictions"]]
    for prefix, section in (("", "Per image"), ("generator_all/", "Per generator, all images of each")):
        _check_row(report, "RE-Net", [_recompute(z, prefix) for z in npzs], prefix, section)
    # The mean/mode baseline, fitted on each split's training generators (train + validation).
    ds = re116.load_dataset(runs["dataset"])
    base = []
    for z, workdir in zip(npzs, method[0]["workdirs"]):
        sel = json.loads(next((Path(workdir) / "eval").glob("test_metrics_step*.json")).read_text())
        assert not set(sel["train_generators"] + sel["val_generators"]) & set(sel["test_generators"])
        rows = ds.labels[ds.rows(sel["train_generators"] + sel["val_generators"])]
        base.append(_recompute(z, "", baseline_rows=rows))
    _check_row(report, evaluation.BASELINE_LABEL, base, "", "Per image")


def test_confusion_counts_and_plots(report):
    method = report["json"]["methods"][0]
    npzs = [np.load(p) for p in method["predictions"]]
    for t in targets.DISCRETE_TARGETS:
        expected = sum(confusion_matrix(targets.split_labels(z["label_rows"])[t.name], z[t.name],
                                        labels=list(range(t.num_classes))) for z in npzs)
        np.testing.assert_array_equal(np.asarray(method["confusion"][t.name]), expected)
        assert expected.sum() == sum(len(z["generator"]) for z in npzs)
    for label in ("RE-Net", evaluation.BASELINE_LABEL):
        path = report["json"]["files"][f"confusion/{label}"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200


def test_per_generator_rows_and_every_granularity_are_reported(report):
    sections = {s for s, _ in report["tables"]}
    assert sections == {"Per image", "Per generator, N = 1 images of each",
                        "Per generator, N = 10 images of each", "Per generator, N = 100 images of each",
                        "Per generator, all images of each"}
    mean = report["json"]["methods"][0]["mean"]
    # 16 images per generator: N = 100 takes them all, so it equals "all"
    assert mean["generator_n100/f1/flags_mean"] == mean["generator_all/f1/flags_mean"]


def test_two_runs_of_one_split_are_refused(runs):
    with pytest.raises(ValueError, match="two runs labelled 'RE-Net' for split 1"):
        evaluation.evaluate([runs["A"], runs["B"]])


def test_missing_workdir_is_a_clear_error(runs, tmp_path):
    done = subprocess.run([sys.executable, "eval.py", "--workdir", str(tmp_path / "nothing*"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=runs["env"], capture_output=True, text=True)
    assert done.returncode == 2 and "no training workdir" in done.stderr


def test_pooled_scores_are_score_runs_tables(runs, tmp_path):
    from adaparse_jax import scoring

    out = tmp_path / "pooled"
    done = subprocess.run([sys.executable, "eval.py", "--pooled", "--workdir", str(runs["root"] / "[AC]"),
                           "--out", str(out), "--n-resamples", "99"], cwd=ROOT, env=runs["env"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    want = reporting.scores_markdown(scoring.score_runs([runs["A"], runs["C"]], n_resamples=99))
    assert (out / "scores.md").read_text() == want and want in done.stdout
    assert json.loads((out / "scores.json").read_text())["folds"] == ["1", "2"]
    done = subprocess.run([sys.executable, "eval.py", "--pooled", "--workdir", str(runs["A"]), "--out",
                           str(out), "--probe", str(tmp_path / "no_zoo")], cwd=ROOT, env=runs["env"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no_zoo" in done.stderr


def test_parse_reads_a_folder_as_the_evaluation_did(runs):
    sel = evaluation.evaluate_run(runs["A"])
    saved = evaluation.load_predictions(sel["predictions"])
    folder = runs["dataset"] / "images" / "SYN_00"
    results = parse(runs["A"], folder=folder)["images"]
    rows = np.flatnonzero(saved["generator"] == 0)
    assert len(results) == len(rows) == 16
    for r, i in zip(results, rows):
        assert r["image"].endswith(str(saved["paths"][i]).split("/")[-1])
        np.testing.assert_allclose([r["continuous"][t.name]["normalised"] for t in targets.CONTINUOUS_TARGETS],
                                   saved["continuous"][i], rtol=1e-5, atol=1e-6)
        for t in targets.DISCRETE_TARGETS:
            assert r["discrete"][t.name]["class_id"] == int(saved[t.name][i])
        for t in targets.FLAG_TARGETS:
            assert r["loss_flags"][t.name]["used"] == bool(saved[t.name][i] == 1)
    one = parse(runs["A"], [np.asarray(Image.open(folder / "0000.png"))])["images"]
    assert one[0]["discrete"] == results[0]["discrete"]


def test_rescoring_saved_predictions_reads_no_cache(runs, tmp_path):
    import shutil

    copy = tmp_path / "A"
    shutil.copytree(runs["A"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"].update(cache=str(tmp_path / "no_cache"), prepare=False)  # no cache to read
    (copy / "config.json").write_text(json.dumps(config))
    again = evaluation.evaluate_run(copy)
    assert again["metrics"] == evaluation.evaluate_run(runs["A"])["metrics"]
    assert not (tmp_path / "no_cache").exists()


def test_facts_without_metrics_match_the_evaluation_and_write_nothing(runs, tmp_path, monkeypatch):
    """scoring.score_runs pools the folds itself: evaluate_run(with_metrics=False) gives the run's
    facts (the same as the full evaluation's) without scoring them or rewriting the metrics file."""
    import shutil

    from adaparse_jax import metrics as metrics_lib

    copy = tmp_path / "A"
    shutil.copytree(runs["A"], copy)
    full = evaluation.evaluate_run(copy)
    written = {p: p.stat().st_mtime_ns for p in (copy / evaluation.EVAL_DIR).iterdir()}
    monkeypatch.setattr(metrics_lib, "compute_metrics", lambda *a, **k: pytest.fail("scored"))
    facts = evaluation.evaluate_run(copy, with_metrics=False)
    assert facts == {k: v for k, v in full.items() if k in facts}
    assert {"metrics", "baseline_metrics", "confusion", "baseline_confusion"}.isdisjoint(facts)
    assert {p: p.stat().st_mtime_ns for p in (copy / evaluation.EVAL_DIR).iterdir()} == written


def test_runs_of_two_datasets_keep_both_splits(monkeypatch):
    """Duplicates are found per (dataset, split); the per-split numbers are kept per (dataset, split)
    too, so split 1 of one dataset never overwrites split 1 of another."""
    def fake(workdir, **kw):
        dataset, value = {"a": ("zoo_a", 0.2), "b": ("zoo_b", 0.6)}[Path(workdir).name]
        metrics = {"f1/flags_mean": value}
        return {"label": "Random G.T. (AdaParse)", "dataset": dataset, "split": "1", "workdir": workdir,
                "step": 1, "selection": "last", "num_images": 4, "metrics": metrics,
                "baseline_metrics": metrics, "confusion": {"x": [[1]]}, "baseline_confusion": {"x": [[1]]},
                "predictions": "", "test_generators": ["g"]}

    monkeypatch.setattr(evaluation, "expand_workdirs", lambda ws: [Path(w) for w in ws])
    monkeypatch.setattr(evaluation, "evaluate_run", fake)
    report = evaluation.evaluate(["a", "b"])
    (method,) = report["methods"]
    assert method["per_split"] == {"zoo_a/1": {"f1/flags_mean": 0.2}, "zoo_b/1": {"f1/flags_mean": 0.6}}
    assert method["mean"]["f1/flags_mean"] == pytest.approx(0.4)
    assert sorted(report["baseline"]["per_split"]) == ["zoo_a/1", "zoo_b/1"]


def test_eval_flags_use_hyphens_and_keep_the_underscore_spellings():
    sys.path.insert(0, str(ROOT))
    try:
        import eval as eval_cli
    finally:
        sys.path.remove(str(ROOT))
    base = ["--workdir", "runs/a", "--out", "r"]
    hyphen = eval_cli.parser().parse_args(base + ["--images-per-generator", "1,all", "--no-reuse"])
    underscore = eval_cli.parser().parse_args(base + ["--images_per_generator", "1,all", "--no_reuse"])
    assert vars(hyphen) == vars(underscore)
    assert hyphen.images_per_generator == [1, None] and hyphen.no_reuse is True
