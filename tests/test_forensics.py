"""Forensics: the metrics against hand-computed cases; families and real images; and on tiny run A
of train_runs.py, `eval.py --perturb` (its clean row equals the run's own test evaluation) and the
attribute / detect / pairs commands (their tables agree with their counts and with each other)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from train_runs import ROOT, tiny_runs

from adaparse_jax import targets
from adaparse_jax.forensics import __main__ as cli
from adaparse_jax.forensics import features, tasks
from adaparse_jax.zoo import photos

# ------------------------------------------------------------------------------------------------
# Metrics, by hand.


def test_unknown_score_is_one_minus_the_max_probability():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(tasks.unknown_score(probs), [0.3, 0.6, 0.0])


def test_roc_auc_by_hand():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 (pos, neg) pairs are ordered.
    assert tasks.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert tasks.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert tasks.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None


def test_closed_set_by_hand():
    r = tasks.closed_set([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], classes=[0, 1, 2])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert r["chance"] == pytest.approx(1 / 3)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_binary_scores_by_hand():
    r = tasks.binary_scores([0, 0, 1, 1, 1], [0.2, 0.6, 0.7, 0.4, 0.9])
    assert r["accuracy"] == pytest.approx(3 / 5)  # 0.2 -> 0, 0.6 -> 1 (wrong), 0.7, 0.9 right, 0.4 wrong
    assert r["auc"] == pytest.approx(5 / 6)  # pairs (pos, neg): 0.4 < 0.6 is the one misordered
    assert (r["positives"], r["negatives"]) == (3, 2)


def test_pair_similarities_by_hand():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    sim, same, idx = tasks.pair_similarities(emb, np.array([5, 5, 7, 7]))
    assert idx.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    np.testing.assert_allclose(sim, [1.0, 0.0, 2 ** -0.5, 0.0, 2 ** -0.5, 2 ** -0.5], atol=1e-12)
    assert same.tolist() == [True, False, False, False, False, True]
    # Same pairs score 1.0 and 0.707, the different ones 0, 0.707, 0, 0.707: of the 8 (same,
    # different) pairs 1.0 wins 4, 0.707 wins 2 and ties 2 (one half each): AUC = 7 / 8.
    assert tasks.roc_auc(same, sim) == pytest.approx(7 / 8)


def test_family_of_follows_the_loss_flags():
    def row(*flags):
        r = np.zeros(targets.NUM_LABEL_COLUMNS)
        for f in flags:
            r[targets.column_index(f)] = 1
        return r

    assert features.family_of(row("adversarial", "ce")) == "GAN"
    assert features.family_of(row("adversarial", "hinge", "kl")) == "GAN"
    assert features.family_of(row("mse", "kl")) == "autoencoder"
    assert features.family_of(row("l2", "mmd")) == "autoencoder"
    assert features.family_of(row("l1", "adversarial", "ce")) == "GAN + reconstruction"
    assert features.family_of(row("mmd")) == "other"


def test_photograph_crops_come_from_disjoint_photographs_of_the_sampling_region():
    fit, test, info = features.photograph_crops(7, 5, 64, seed=3)
    assert fit.shape == (7, 64, 64, 3) and test.shape == (5, 64, 64, 3) and fit.dtype == np.uint8
    assert not set(info["fit_photographs"]) & set(info["test_photographs"])
    assert sorted(info["fit_photographs"] + info["test_photographs"]) == sorted(photos.PHOTOGRAPHS)
    fit32, _, _ = features.photograph_crops(7, 5, 32, seed=3)
    # The 64-pixel crops are the 32-pixel ones resized bilinearly, as the cache resizes zoo images.
    again = np.asarray(Image.fromarray(fit32[0]).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(fit[0], again)


# ------------------------------------------------------------------------------------------------
# The commands on a tiny run.


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return tiny_runs(tmp_path_factory)["A"]


def _eval_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_perturb_table_next_to_the_clean_scores(run_a, tmp_path, capsys):
    out = tmp_path / "robust"
    assert _eval_cli().main(["--workdir", str(run_a), "--perturb", "jpeg:75", "hflip", "--out", str(out)]) == 0
    report = json.loads((out / "robustness.json").read_text())
    (r,) = report["runs"]
    assert [row["perturbation"] for row in r["rows"]] == ["clean", "jpeg:75", "hflip"]
    # The clean row is the run's own test evaluation (train.py evaluated the same checkpoint).
    (saved,) = (run_a / "eval").glob(f"test_metrics_step{r['step']}.json")
    saved = json.loads(saved.read_text())
    assert r["num_images"] == saved["num_images"]
    for key in ("f1/groups_mean", "f1/flags_mean", "f1/discrete_mean", "l1/continuous_mean",
                "f1/upsampling", "generator_all/f1/discrete_mean"):
        assert r["rows"][0]["metrics"][key] == pytest.approx(saved["metrics"][key], abs=1e-6), key
    assert r["rows"][0]["psnr"] is None and 20 < r["rows"][1]["psnr"] < 60
    text = (out / "robustness.md").read_text()
    clean = r["rows"][0]["metrics"]["f1/discrete_mean"]
    jpeg = r["rows"][1]["metrics"]["f1/discrete_mean"]
    assert f"| jpeg:75 | {r['rows'][1]['psnr']:.1f} |" in text
    assert f"{jpeg:.3f} ({jpeg - clean:+.3f})" in text
    assert "Table XI" in capsys.readouterr().out


def test_eval_perturb_bad_spec_is_refused_before_loading(tmp_path, capsys):
    code = _eval_cli().main(["--workdir", str(tmp_path), "--perturb", "jpeg:101", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "perturbation 'jpeg:101': QUALITY must be an integer 1-100" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def commands(run_a, tmp_path_factory):
    out = tmp_path_factory.mktemp("forensics")
    for command in tasks.COMMANDS:
        assert cli.main([command, "--workdir", str(run_a), "--out", str(out)]) == 0
    return out, {c: json.loads((out / f"{c}.json").read_text()) for c in tasks.COMMANDS}


@pytest.mark.slow
def test_forensics_commands_write_tables_and_roc_plots(commands):
    out, reports = commands
    for c in tasks.COMMANDS:
        assert "ROC AUC" in (out / f"{c}.md").read_text()
        with Image.open(out / f"{c}_roc.png") as im:
            assert im.format == "PNG" and im.size[0] > 300
    a = reports["attribute"]
    held = a["held_out_generators"]
    assert len(a["training_generators"]) == 5 and len(held) == 3  # tiny dataset, split 1
    cm = np.asarray(a["closed_set"]["confusion"])
    assert cm.shape == (5, 5) and cm.sum() == a["test_images"] == 5 * 8  # half of 16 images each
    assert a["closed_set"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert a["open_set"]["unknown_images"] == 3 * 16 and 0 <= a["open_set"]["auc"] <= 1
    d = reports["detect"]
    unseen = d["rows"]["unseen generators (held out)"]
    assert (unseen["positives"], unseen["negatives"]) == (48, d["real"]["test_images"]) == (48, 48)
    families = {a["generators"][n]["family"] for n in held}
    assert {k for k in d["rows"] if k.startswith("unseen, ")} == {f"unseen, {f}" for f in families}
    assert sum(d["rows"][f"unseen, {f}"]["positives"] for f in families) == 48
    p = reports["pairs"]
    overall = p["rows"]["all held-out generators"]
    assert overall["same_pairs"] == 3 * (16 * 15 // 2)
    assert overall["same_pairs"] + overall["different_pairs"] == 48 * 47 // 2
    assert 0 <= overall["auc"] <= 1


@pytest.mark.slow
def test_model_free_probe_features_and_errors(run_a, tmp_path, capsys):
    assert cli.main(["pairs", "--workdir", str(run_a), "--out", str(tmp_path), "--features", "probe"]) == 0
    report = json.loads((tmp_path / "pairs.json").read_text())
    assert report["features"] == "probe" and report["feature_dim"] == 17 * 17 + 4 + 16  # 32 px images
    assert cli.main(["attribute", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["pairs", "--workdir", str(run_a), "--out", str(tmp_path), "--real", str(tmp_path)]) == 2
    assert "--real applies to detect only" in capsys.readouterr().err
