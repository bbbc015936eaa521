"""Honest scoring: macro F1 from confusion matrices vs scikit-learn, permutation p-values vs exact
NumPy enumerations, pooling of folds, the goal check, and `score_runs` on real tiny runs
(recomputed with scikit-learn from the saved predictions)."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from adaparse_jax import evaluation, metrics, reporting, scoring, stats, targets


def _sk_f1(y, d):
    return f1_score(y, d, average="macro", zero_division=0)


# ------------------------------------------------------------------------------------------------
# Statistics.


@pytest.mark.parametrize("k", [2, 4])
def test_macro_f1_from_confusion_equals_sklearn(k):
    rng = np.random.default_rng(k)
    cases = []
    for n in (5, 17, 60):
        y = rng.integers(0, k, n)
        d = np.where(rng.random(n) < 0.5, y, rng.integers(0, k, n))
        cases.append((y, d))
    cases.append((np.zeros(6, int), np.zeros(6, int)))  # one class only, perfect
    cases.append((np.zeros(6, int), np.full(6, k - 1)))  # all wrong: F1 0 for both present classes
    cases.append((np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])))  # a class never predicted
    matrices = np.stack([confusion_matrix(y, d, labels=list(range(k))) for y, d in cases])
    got = stats.macro_f1_from_confusion(matrices)  # batched
    want = [_sk_f1(y, d) for y, d in cases]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _exact_pvalue(stat, labels, greater=True):
    """p over all G! permutations of the labels (NumPy reference, no scipy)."""
    obs = stat(labels)
    null = np.array([stat(labels[list(p)]) for p in itertools.permutations(range(len(labels)))])
    return float(np.mean(null >= obs - 1e-12) if greater else np.mean(null <= obs + 1e-12)), obs


def test_generator_level_pvalue_is_exact_enumeration():
    y = np.array([0, 1, 2, 3, 0])
    d = np.array([0, 1, 2, 1, 0])  # 120 permutations < n_resamples: scipy enumerates them all
    want_p, want_f1 = _exact_pvalue(lambda lab: _sk_f1(lab, d), y)
    got = stats.permutation_test(y, np.eye(4)[d], 4)
    assert got.statistic == pytest.approx(want_f1, abs=1e-12)
    assert got.statistic == pytest.approx(_sk_f1(y, d), abs=1e-12)
    assert got.pvalue == pytest.approx(want_p, abs=1e-12)
    assert 0 < got.pvalue < 0.2
    assert got.null_mean < got.statistic


def test_image_level_pvalue_moves_images_with_their_generator():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 1, 0, 1])
    gens = np.repeat(np.arange(5), [3, 5, 2, 4, 1])  # unequal image counts
    di = np.where(rng.random(len(gens)) < 0.7, y[gens], 1 - y[gens])
    ids, counts = stats.decision_counts(di, gens, 2)
    assert ids.tolist() == list(range(5)) and counts.sum() == len(gens)
    # Reference: each image takes its generator's (permuted) label; sklearn's F1 over images.
    want_p, want_f1 = _exact_pvalue(lambda lab: _sk_f1(lab[gens], di), y)
    got = stats.permutation_test(y, counts, 2)
    assert got.statistic == pytest.approx(want_f1, abs=1e-12)
    assert got.pvalue == pytest.approx(want_p, abs=1e-12)


def test_l1_pvalue_is_exact_enumeration():
    y = np.array([0.1, 0.5, 0.9, 0.3, 0.7])
    pred = np.array([0.2, 0.4, 0.8, 0.5, 0.6])
    want_p, want_l1 = _exact_pvalue(lambda lab: np.abs(lab - pred).mean(), y, greater=False)
    got = stats.l1_permutation_test(y, pred)
    assert got.statistic == pytest.approx(want_l1, abs=1e-12)
    assert got.pvalue == pytest.approx(want_p, abs=1e-12)


def test_monte_carlo_pvalue_matches_a_numpy_reference():
    rng = np.random.default_rng(2)
    g, k, b = 40, 4, 800
    y = rng.integers(0, k, g)
    d = np.where(rng.random(g) < 0.15, y, rng.integers(0, k, g))  # weak signal: p in (0, 1)
    obs = _sk_f1(y, d)
    null = np.array([_sk_f1(y[rng.permutation(g)], d) for _ in range(b)])
    want = (1 + np.sum(null >= obs - 1e-12)) / (1 + b)
    got = stats.permutation_test(y, np.eye(k)[d], k, n_resamples=b, seed=0)
    # Two independent Monte-Carlo estimates of the same p: within a few standard errors.
    se = np.sqrt(want * (1 - want) / b)
    assert abs(got.pvalue - want) < 5 * se + 1e-3, (got.pvalue, want)
    assert got.null_mean == pytest.approx(null.mean(), abs=0.01)


def test_pvalue_extremes():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 40)
    perfect = stats.permutation_test(y, np.eye(4)[y], 4, n_resamples=999)
    assert perfect.statistic == 1.0 and perfect.pvalue == pytest.approx(1 / 1000)
    constant = stats.permutation_test(y, np.eye(4)[np.zeros(40, int)], 4, n_resamples=999)
    assert constant.pvalue == 1.0  # a constant decision scores the same under every permutation
    with pytest.raises(ValueError, match="counts have shape"):
        stats.permutation_test(y, np.eye(3)[y % 3], 4)
    with pytest.raises(ValueError, match="class ids outside"):
        stats.decision_counts([0, 4], [0, 1], 4)


# ------------------------------------------------------------------------------------------------
# Pooling and scoring predictions.


def _fake_fold(gens, rng, label_table, accuracy=0.8, images=5):
    """Per-image predictions of one fold: each image right with probability `accuracy`."""
    g = np.repeat(np.asarray(gens), images)
    rows = label_table[g]
    lab = targets.split_labels(rows)
    out = {"generator": g, "label_rows": rows,
           targets.CONTINUOUS: np.clip(lab[targets.CONTINUOUS] + rng.normal(0, 0.1, (len(g), 9)), 0, 1)}
    for t in targets.CLASSIFICATION_TARGETS:
        noise = rng.integers(0, t.num_classes, len(g))
        out[t.name] = np.where(rng.random(len(g)) < accuracy, lab[t.name], noise).astype(np.int32)
    return out


def _label_table(g, rng):
    cols = []
    for t in targets.LABEL_COLUMNS:
        cols.append(rng.random(g) if t.kind == targets.CONTINUOUS else rng.integers(0, t.num_classes, g))
    return np.stack(cols, 1).astype(np.float32)


def test_pool_and_score_held_out_against_references():
    rng = np.random.default_rng(4)
    table = _label_table(20, rng)
    folds = np.array_split(rng.permutation(20), 3)
    parts = [(str(i + 1), _fake_fold(f, rng, table, accuracy=0.6)) for i, f in enumerate(folds)]
    held = stats.pool(parts, ["a", "b", "c"])
    assert sorted(np.unique(held.generators).tolist()) == list(range(20))
    scores = stats.score_held_out(held, n_resamples=199)
    assert scores["num_generators"] == 20 and scores["num_images"] == 100
    gens = held.generators
    for t in (*targets.DISCRETE_TARGETS, targets.GROUPS[0], targets.FLAG_TARGETS[3]):
        y_img = table[gens, targets.column_index(t.name)].astype(int)
        d_img = held.predictions[t.name]
        # majority vote per generator, ties to the smaller id (NumPy reference)
        votes = np.array([np.bincount(d_img[gens == g], minlength=t.num_classes).argmax() for g in range(20)])
        y_gen = table[:, targets.column_index(t.name)].astype(int)
        e = scores["targets"][t.name]
        assert e["f1_generator"] == pytest.approx(_sk_f1(y_gen, votes), abs=1e-12)
        assert e["f1_image"] == pytest.approx(_sk_f1(y_img, d_img), abs=1e-12)
        assert e["acc_generator"] == pytest.approx(np.mean(votes == y_gen))
        assert 1 / 200 <= e["p_generator"] <= 1 and 1 / 200 <= e["p_image"] <= 1
    for j, t in enumerate(targets.CONTINUOUS_TARGETS):
        mean_pred = np.array([held.predictions[targets.CONTINUOUS][gens == g, j].mean() for g in range(20)])
        want = np.abs(mean_pred - table[:, targets.column_index(t.name)]).mean()
        assert scores["targets"][t.name]["l1_generator"] == pytest.approx(want, abs=1e-6)
    disc = np.mean([scores["targets"][t.name]["f1_generator"] for t in targets.DISCRETE_TARGETS])
    assert scores["means"]["discrete/f1_generator"] == pytest.approx(disc)
    # 60 % right images make a nearly always right majority vote: strong, significant signal.
    assert scores["targets"]["skip"]["p_generator"] < 0.05


def test_pool_refuses_overlapping_or_repeated_folds():
    rng = np.random.default_rng(5)
    table = _label_table(6, rng)
    a = _fake_fold([0, 1, 2], rng, table)
    b = _fake_fold([2, 3], rng, table)
    with pytest.raises(ValueError, match="generator row 2 is held out in fold 1 and in fold 2"):
        stats.pool([("1", a), ("2", b)])
    with pytest.raises(ValueError, match="appear twice"):
        stats.pool([("1", a), ("1", _fake_fold([4], rng, table))])


def test_ensemble_predictions_average_probabilities_per_image():
    rng = np.random.default_rng(7)
    table = _label_table(6, rng)
    members = []
    for _ in range(3):
        m = _fake_fold([0, 1, 2], rng, table)
        for t in targets.CLASSIFICATION_TARGETS:
            m[f"prob/{t.name}"] = rng.dirichlet(np.ones(t.num_classes), len(m["generator"])).astype(np.float32)
        members.append(m)
    e = evaluation.ensemble_predictions(members)
    for t in targets.CLASSIFICATION_TARGETS:
        mean = (members[0][f"prob/{t.name}"].astype(np.float64) + members[1][f"prob/{t.name}"]
                + members[2][f"prob/{t.name}"]) / 3
        np.testing.assert_allclose(e[f"prob/{t.name}"], mean, rtol=1e-6)
        np.testing.assert_array_equal(e[t.name], mean.argmax(-1))
    np.testing.assert_allclose(e[targets.CONTINUOUS], np.mean([m[targets.CONTINUOUS] for m in members], 0),
                               rtol=1e-6)
    np.testing.assert_array_equal(e["generator"], members[0]["generator"])
    other = dict(members[1], generator=members[1]["generator"][::-1])
    with pytest.raises(ValueError, match="b.npz: predicts other images than a.npz"):
        evaluation.ensemble_predictions([members[0], other], ["a.npz", "b.npz"])


def _method(label, f1s, p, l1, replicates=1):
    disc = {t.name: {"f1_generator": f, "p_generator": p_} for t, f, p_ in
            zip(targets.DISCRETE_TARGETS, f1s, p)}
    cont = {t.name: {"l1_generator": l1} for t in targets.CONTINUOUS_TARGETS}
    return {"label": label, "random_gt": label.startswith("Random"), "replicates": [{}] * replicates,
            "targets": {**disc, **cont},
            "means": {"discrete/f1_generator": float(np.mean(f1s)), "continuous/l1_generator": l1}}


def test_goal_criteria():
    ada = _method("AdaParse", [0.9, 0.8, 0.7, 0.6, 0.3, 0.3], [1e-4, 1e-4, 0.005, 0.009, 0.5, 0.02], 0.20)
    rgt = _method("Random G.T. (AdaParse)", [0.4] * 6, [0.5] * 6, 0.25, replicates=3)
    base = _method(scoring.BASELINE_LABEL, [0.1] * 6, [1.0] * 6, 0.22)
    report = {"methods": [ada, rgt], "baseline": base}
    g = scoring.goal(report)
    assert g["margin"] == pytest.approx(0.6 - 0.4)
    assert g["significant"] == ["normalization", "nonlin_block", "nonlin_last", "upsampling"]
    assert g["beats_random_gt"] and g["enough_significant"] and g["beats_mean_predictor"] and g["met"]
    assert "Goal met" in reporting.goal_markdown(g)
    ada["targets"]["nonlin_last"]["p_generator"] = 0.01  # not < 0.01: 3 of 6 left
    base["means"]["continuous/l1_generator"] = 0.19
    g = scoring.goal(report)
    assert not g["enough_significant"] and not g["beats_mean_predictor"] and not g["met"]
    assert "Goal not met" in reporting.goal_markdown(g)
    with pytest.raises(KeyError, match="no method 'RE-Net'"):
        scoring.goal(report, "RE-Net")
    # An ensemble of AdaParse's seeds is compared with AdaParse's Random G.T.
    ens = dict(ada, label=scoring.ensemble_label("AdaParse", 3), ensemble_of="AdaParse")
    g = scoring.goal({"methods": [ada, ens, rgt], "baseline": base}, ens["label"])
    assert g["random_gt"] == "Random G.T. (AdaParse)" and g["margin"] == pytest.approx(0.2)
    # The demo's goal (b): 3 attributes at p < 0.01, no counts criterion, the probe reached on 3
    # of the attributes it reads (all of them when it reads fewer).
    names = [t.name for t in targets.DISCRETE_TARGETS]
    probe = {n: {"f1": f, "p": p} for n, f, p in zip(names, [0.85, 0.7, 0.6, 0.9, 0.5, 0.5], [1e-4] * 4 + [0.3] * 2)}
    g = scoring.goal(report, probe=probe, **scoring.DEMO_GOAL_B)
    assert g["enough_significant"] and not g["beats_mean_predictor"]  # counts are not asked
    assert g["probe_read"] == ["normalization", "nonlin_block", "nonlin_last", "upsampling"]
    assert g["probe_reached"] == ["normalization", "nonlin_block", "nonlin_last"] and g["met"]
    text = reporting.goal_markdown(g)
    assert "counts" not in text and "spectral probe on 3 of the 4 attributes" in text and "Goal met" in text
    ada["targets"]["nonlin_last"]["f1_generator"] = 0.55  # below the probe's 0.6: 2 of 4 reached
    assert not scoring.goal(report, probe=probe, **scoring.DEMO_GOAL_B)["met"]
    one = {n: dict(r, p=0.5) for n, r in probe.items()} | {"normalization": probe["normalization"]}
    g = scoring.goal(report, probe=one, **scoring.DEMO_GOAL_B)  # the probe reads one: reaching it is enough
    assert g["probe_read"] == ["normalization"] and g["reaches_probe"] and g["met"]


# ------------------------------------------------------------------------------------------------
# score_runs on real runs (the tiny RE-Net runs of train_runs.py: splits 1 and 2 of 8 generators).


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from train_runs import tiny_runs

    return tiny_runs(tmp_path_factory)


@pytest.mark.slow
def test_score_runs_on_real_runs(runs):
    report = scoring.score_runs([runs["A"], runs["C"]], n_resamples=99)
    assert [m["label"] for m in report["methods"]] == ["RE-Net"]
    m = report["methods"][0]
    assert m["replicates"][0]["folds"] == ["1", "2"]
    preds = [evaluation.load_predictions(next((runs[k] / "eval").glob("test_predictions_step*.npz")))
             for k in ("A", "C")]
    gens = np.concatenate([p["generator"] for p in preds])
    assert report["num_generators"] == len(np.unique(gens)) == 4
    for t in targets.DISCRETE_TARGETS:
        d = np.concatenate([p[t.name] for p in preds])
        y = np.concatenate([p["label_rows"][:, targets.column_index(t.name)] for p in preds]).astype(int)
        votes = [metrics.majority_vote(d[gens == g], t.num_classes) for g in np.unique(gens)]
        y_gen = [y[gens == g][0] for g in np.unique(gens)]
        assert m["targets"][t.name]["f1_image"] == pytest.approx(_sk_f1(y, d), abs=1e-12)
        assert m["targets"][t.name]["f1_generator"] == pytest.approx(_sk_f1(y_gen, votes), abs=1e-12)
    # The mean/mode predictor of each fold is fitted on that fold's training generators.
    base = report["baseline"]["targets"]
    assert set(base) == {t.name for t in targets.HEADS + targets.GROUPS}
    text = reporting.scores_markdown(report)
    assert "Table III: discrete architecture, macro F1, per generator" in text
    assert "| RE-Net |" in text and f"| {scoring.BASELINE_LABEL} |" in text
    # A second training seed (copies of A and C with seed 1 and other probabilities) makes two
    # replicates and their ensemble: per image the mean of the seeds' probabilities, then scored.
    seed1 = {}
    rng = np.random.default_rng(3)
    for k in ("A", "C"):
        seed1[k] = runs["root"] / f"{k}_seed1"
        if not seed1[k].exists():
            shutil.copytree(runs[k], seed1[k])
            cfg = json.loads((seed1[k] / "config.json").read_text())
            cfg["seed"] = 1
            (seed1[k] / "config.json").write_text(json.dumps(cfg))
            f = next((seed1[k] / "eval").glob("test_predictions_step*.npz"))
            p = evaluation.load_predictions(f)
            for t in targets.CLASSIFICATION_TARGETS:
                p[f"prob/{t.name}"] = rng.dirichlet(np.ones(t.num_classes), len(p["generator"]))
                p[t.name] = p[f"prob/{t.name}"].argmax(-1)
            evaluation.save_predictions(f, p, generator_names=p["generator_names"], paths=p["paths"])
    report = scoring.score_runs([runs["A"], runs["C"], seed1["A"], seed1["C"]], n_resamples=99)
    assert [m["label"] for m in report["methods"]] == ["RE-Net", scoring.ensemble_label("RE-Net", 2)]
    plain, ens = report["methods"]
    assert [r["key"] for r in plain["replicates"]] == [0, 1] and ens["ensemble_of"] == "RE-Net"
    preds1 = [evaluation.load_predictions(next((seed1[k] / "eval").glob("test_predictions_step*.npz")))
              for k in ("A", "C")]
    for t in targets.DISCRETE_TARGETS:
        prob = np.concatenate([(p0[f"prob/{t.name}"] + p1[f"prob/{t.name}"]) / 2
                               for p0, p1 in zip(preds, preds1)])
        d = prob.argmax(-1)
        y = np.concatenate([p["label_rows"][:, targets.column_index(t.name)] for p in preds]).astype(int)
        assert ens["targets"][t.name]["f1_image"] == pytest.approx(_sk_f1(y, d), abs=1e-12)
    assert "RE-Net, ensemble of 2**: 1 replicate(s) (seeds 0+1)" in reporting.scores_markdown(report)
    assert [m["label"] for m in scoring.score_runs([runs["A"], runs["C"], seed1["A"], seed1["C"]],
                                                   n_resamples=9, ensembles=False)["methods"]] == ["RE-Net"]
    # Random G.T. seeds (each its own label permutation) are replicates, never an ensemble.
    rgt = []
    for k in ("A", "C"):
        for s in (0, 1):
            d = runs["root"] / f"{k}_random_gt{s}"
            if not d.exists():
                shutil.copytree(runs[k], d)
                cfg = json.loads((d / "config.json").read_text())
                cfg.update(random_gt=True, random_gt_seed=s)
                (d / "config.json").write_text(json.dumps(cfg))
            rgt.append(d)
    report = scoring.score_runs([runs["A"], runs["C"], *rgt], n_resamples=9)
    assert [(m["label"], len(m["replicates"])) for m in report["methods"]] == [
        ("RE-Net", 1), ("Random G.T. (RE-Net)", 2)]
    # Run B repeats split 1 of the same method and seed: the folds of one replicate would overlap.
    with pytest.raises(ValueError, match="appear twice"):
        scoring.score_runs([runs["A"], runs["B"], runs["C"]], n_resamples=9)
