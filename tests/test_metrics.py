"""Metrics on hand-made cases: values worked out by hand, sklearn semantics, aggregation, baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaparse_jax import metrics, targets

CLASS_NAMES = [t.name for t in targets.CLASSIFICATION_TARGETS]


def label_rows(cont, classes):
    """[N, 28] rows from continuous values [N, 9] and {name: [N] ids} (0 where not given)."""
    n = len(cont)
    net = np.zeros((n, 15))
    net[:, :9] = cont
    loss10, loss3 = np.zeros((n, 10)), np.zeros((n, 3))
    for t in targets.CLASSIFICATION_TARGETS:
        table = {targets.NET_TABLE: net, targets.LOSS10_TABLE: loss10, targets.LOSS3_TABLE: loss3}[t.table]
        table[:, t.column] = classes.get(t.name, 0)
    return targets.label_matrix({targets.NET_TABLE: net, targets.LOSS10_TABLE: loss10,
                                 targets.LOSS3_TABLE: loss3})


def preds(cont, classes):
    out = {"continuous": np.asarray(cont, np.float32)}
    for name in CLASS_NAMES:
        out[name] = np.asarray(classes.get(name, np.zeros(len(cont), int)), np.int32)
    return out


def test_hand_computed_values():
    gt_cont = np.zeros((4, 9))
    gt_cont[:, 0] = [0.0, 0.5, 1.0, 0.25]
    pr_cont = gt_cont.copy()
    pr_cont[:, 0] += [0.1, -0.3, 0.0, 0.2]  # L1 of 'layers' = 0.6 / 4
    pr_cont[:, 8] = 0.5  # L1 of 'parameters' = 0.5
    truth = {"skip": [0, 0, 1, 1], "normalization": [0, 1, 2, 3], "l2": [1, 1, 1, 1]}
    guess = {"skip": [0, 1, 1, 1], "normalization": [0, 1, 2, 2], "l2": [1, 1, 1, 1]}
    m = metrics.score(preds(pr_cont, guess), label_rows(gt_cont, truth))
    assert m["l1/layers"] == pytest.approx(0.15)
    assert m["l1/parameters"] == pytest.approx(0.5)
    assert m["l1/filters"] == 0.0
    assert m["l1/continuous_mean"] == pytest.approx(0.65 / 9)
    assert m["l1/continuous_std"] == pytest.approx(np.std([0.15, 0.5] + [0.0] * 7))
    # skip: class 0 P=1 R=1/2 F=2/3; class 1 P=2/3 R=1 F=4/5.
    assert m["acc/skip"] == 0.75
    assert m["f1/skip"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # normalization: classes 0, 1 perfect; class 2 P=1/2 R=1 F=2/3; class 3 never predicted: F=0.
    assert m["acc/normalization"] == 0.75
    assert m["f1/normalization"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert m["f1/l2"] == 1.0  # only one class present in labels and predictions
    discrete = [m[f"f1/{t.name}"] for t in targets.DISCRETE_TARGETS]
    assert m["f1/discrete_mean"] == pytest.approx(np.mean(discrete))
    assert m["acc/flags_mean"] == pytest.approx(np.mean([m[f"acc/{t.name}"] for t in targets.FLAG_TARGETS]))
    assert m["f1/groups_mean"] == pytest.approx(np.mean([m[f"f1/{t.name}"] for t in targets.GROUPS]))
    expected = ({f"l1/{t.name}" for t in targets.CONTINUOUS_TARGETS}
                | {f"{k}/{n}" for k in ("acc", "f1") for n in CLASS_NAMES}
                | {"l1/continuous_mean", "l1/continuous_std"}
                | {f"{k}/{f}_mean" for k in ("acc", "f1") for f in ("discrete", "groups", "flags")})
    assert set(m) == expected


def test_zero_division_gives_zero_not_a_warning_value():
    cont = np.zeros((3, 9))
    # Labels all 0, predictions all 1: both classes have an undefined precision or recall -> F1 0.
    m = metrics.score(preds(cont, {"ce": [1, 1, 1]}), label_rows(cont, {"ce": [0, 0, 0]}))
    assert m["f1/ce"] == 0.0 and m["acc/ce"] == 0.0
    # Labels 0 0 1, predictions all 0: class 1 is never predicted (P undefined -> 0).
    m = metrics.score(preds(cont, {"ce": [0, 0, 0]}), label_rows(cont, {"ce": [0, 0, 1]}))
    assert m["f1/ce"] == pytest.approx((0.8 + 0.0) / 2)


def test_score_matches_sklearn_on_random_predictions():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    n = 50
    classes = {t.name: rng.integers(0, t.num_classes, n) for t in targets.CLASSIFICATION_TARGETS}
    guess = {t.name: rng.integers(0, t.num_classes, n) for t in targets.CLASSIFICATION_TARGETS}
    cont, pr = rng.uniform(size=(n, 9)), rng.uniform(size=(n, 9))
    m = metrics.score(preds(pr, guess), label_rows(cont, classes))
    for t in targets.CLASSIFICATION_TARGETS:
        assert m[f"f1/{t.name}"] == pytest.approx(
            f1_score(classes[t.name], guess[t.name], average="macro", zero_division=0))
        assert m[f"acc/{t.name}"] == pytest.approx(accuracy_score(classes[t.name], guess[t.name]))
    np.testing.assert_allclose([m[f"l1/{t.name}"] for t in targets.CONTINUOUS_TARGETS],
                               np.abs(pr - cont.astype(np.float32)).mean(0), rtol=1e-6)


def test_predictions_from_outputs_argmax_of_probs_also_under_jit():
    rng = np.random.default_rng(1)
    probs = {t.name: rng.uniform(size=(5, t.num_classes)).astype(np.float32)
             for t in targets.CLASSIFICATION_TARGETS}
    outputs = {"continuous": rng.uniform(size=(5, 9)).astype(np.float32), "probs": probs}
    got = metrics.predictions_from_outputs(outputs)
    jitted = jax.jit(metrics.predictions_from_outputs)(jax.tree.map(jnp.asarray, outputs))
    for name in CLASS_NAMES:
        np.testing.assert_array_equal(got[name], probs[name].argmax(-1))
        np.testing.assert_array_equal(np.asarray(jitted[name]), got[name])
        assert got[name].dtype == np.int32
    np.testing.assert_array_equal(got["continuous"], outputs["continuous"])


def aggregation_fixture():
    """Generator 7: 3 images, generator 2: 4 images, interleaved."""
    gens = np.array([7, 2, 7, 2, 2, 7, 2])
    cont = np.zeros((7, 9))
    cont[:, 0] = [0.1, 0.2, 0.4, 0.4, 0.6, 0.7, 0.8]
    classes = {
        "normalization": [3, 1, 3, 2, 1, 0, 2],  # gen 7: 3 3 0 -> 3; gen 2: 1 2 1 2 -> tie -> 1
        "skip": [1, 0, 0, 0, 0, 1, 1],  # gen 7: 1 0 1 -> 1; gen 2: 0 0 0 1 -> 0
    }
    return gens, preds(cont, classes)


def test_aggregate_all_images_mean_and_majority_vote():
    gens, p = aggregation_fixture()
    agg, ids = metrics.aggregate_by_generator(p, gens)
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_allclose(agg["continuous"][:, 0], [(0.2 + 0.4 + 0.6 + 0.8) / 4, (0.1 + 0.4 + 0.7) / 3],
                               rtol=1e-6)
    np.testing.assert_array_equal(agg["normalization"], [1, 3])
    np.testing.assert_array_equal(agg["skip"], [0, 1])
    np.testing.assert_array_equal(agg["ce"], [0, 0])


def test_sampling_is_deterministic_sized_and_per_generator():
    gens = np.repeat(np.arange(5), 30)
    a = metrics.sample_per_generator(gens, 10, seed=3)
    b = metrics.sample_per_generator(gens, 10, seed=3)
    c = metrics.sample_per_generator(gens, 10, seed=4)
    assert all(np.array_equal(a[g], b[g]) for g in a)
    assert any(not np.array_equal(a[g], c[g]) for g in a)
    assert all(len(a[g]) == 10 and np.all(gens[a[g]] == g) and len(set(a[g])) == 10 for g in a)
    # The draw of a generator does not depend on which other generators are present.
    keep = gens != 1
    sub = metrics.sample_per_generator(gens[keep], 10, seed=3)
    assert np.array_equal(np.flatnonzero(keep)[sub[3]], a[3])
    # Asking for more images than a generator has keeps them all.
    assert len(metrics.sample_per_generator(gens, 100)[0]) == 30
    with pytest.raises(ValueError, match="images per generator"):
        metrics.sample_per_generator(gens, 0)


def test_compute_metrics_per_image_and_per_generator():
    gens, p = aggregation_fixture()
    truth = {"normalization": np.where(gens == 7, 3, 1), "skip": np.where(gens == 7, 1, 0)}
    rows = label_rows(np.where(gens[:, None] == 7, 0.5, 0.5) * np.ones((7, 9)), truth)
    m = metrics.compute_metrics(p, rows, gens, images_per_generator=(1, 2, None), seed=0)
    assert m["num_images"] == 7 and m["num_generators"] == 2
    assert m["acc/normalization"] == pytest.approx(4 / 7)  # 3 3 . / 1 . 1 . correct
    assert m["generator_all/acc/normalization"] == 1.0
    assert m["generator_all/acc/skip"] == 1.0
    assert m["generator_all/f1/skip"] == 1.0
    for prefix in ("generator_n1", "generator_n2", "generator_all"):
        assert f"{prefix}/f1/discrete_mean" in m and f"{prefix}/l1/continuous_mean" in m
    # Per-generator N=1 equals scoring the drawn image of each generator directly.
    pick = metrics.sample_per_generator(gens, 1, seed=0)
    idx = np.array([pick[g][0] for g in sorted(pick)])
    direct = metrics.score({k: v[idx] for k, v in p.items()}, rows[idx])
    assert all(m[f"generator_n1/{k}"] == pytest.approx(v) for k, v in direct.items())
    assert set(metrics.compute_metrics(p, rows)) == set(direct) | {"num_images"}


def test_inconsistent_generator_labels_raise():
    gens, p = aggregation_fixture()
    rows = label_rows(np.zeros((7, 9)), {"skip": [0, 0, 0, 0, 0, 1, 0]})
    with pytest.raises(ValueError, match="generator 7"):
        metrics.compute_metrics(p, rows, gens)


def test_shape_errors_name_the_input():
    gens, p = aggregation_fixture()
    with pytest.raises(ValueError, match="label rows"):
        metrics.score(p, np.zeros((7, 27)))
    with pytest.raises(ValueError, match="'skip'"):
        metrics.score(dict(p, skip=p["skip"][:3]), label_rows(np.zeros((7, 9)), {}))
    with pytest.raises(KeyError, match="hinge"):
        metrics.score({k: v for k, v in p.items() if k != "hinge"}, label_rows(np.zeros((7, 9)), {}))


def test_mean_mode_baseline():
    cont = np.zeros((5, 9))
    cont[:, 2] = [0.0, 0.1, 0.2, 0.3, 1.0]
    rows = label_rows(cont, {"nonlin_block": [2, 2, 1, 1, 3], "upsampling": [1, 1, 1, 0, 0],
                             "wgan": [0, 1, 1, 1, 0]})
    base = metrics.mean_mode_baseline(rows, 3)
    assert base["continuous"].shape == (3, 9)
    np.testing.assert_allclose(base["continuous"][:, 2], 0.32, rtol=1e-6)
    np.testing.assert_array_equal(base["nonlin_block"], [1, 1, 1])  # tie 1/2 -> the smaller id
    np.testing.assert_array_equal(base["upsampling"], [1, 1, 1])
    np.testing.assert_array_equal(base["wgan"], [1, 1, 1])
    np.testing.assert_array_equal(base["normalization"], [0, 0, 0])
    # The baseline scores like any parser: it gets the mode-class generators right.
    m = metrics.score(metrics.mean_mode_baseline(rows, 5), rows)
    assert m["acc/upsampling"] == pytest.approx(3 / 5)
    assert m["l1/fc_layers"] == pytest.approx(np.abs(cont[:, 2] - 0.32).mean(), rel=1e-6)
