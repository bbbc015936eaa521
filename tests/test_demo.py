"""`make demo`: its config, its run plan, the train configs it derives, and the whole orchestration
on a micro setting (a generated dataset standing in for the zoo, tiny RE-Net, one epoch): every
run trained on its fold with the right labels, the printed tables equal the scoring of the runs,
and a rerun reuses everything."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from adaparse_jax import demo, models, reporting, scoring, targets
from adaparse_jax import train as training
from adaparse_jax.data import re116, synthetic
from adaparse_jax.diagnose import fingerprints
from adaparse_jax.diagnose import main as diagnose_main
from adaparse_jax.zoo import probe as zoo_probe

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.py"


def _config(overrides=()):
    return training.load_config(CONFIG, list(overrides))


def test_config_loads_overrides_and_is_a_narrowed_official_model():
    c = _config(["--config.workdir=/tmp/x", "--config.train.num_epochs=2", "--config.zoo.seed=3"])
    assert c.workdir == "/tmp/x" and c.train.num_epochs == 2 and c.zoo.seed == 3
    training.validate_config(c.train)
    with pytest.raises(training.ConfigError, match="num_epoch"):
        _config(["--config.train.num_epoch=2"])
    full, narrow = models.model_config("adaparse"), c.train.model
    assert set(full) == set(narrow)  # every field of the product model, some narrowed
    changed = {k for k in full if full[k] != narrow[k]}
    assert changed <= {"image_size", "width", "depth", "source_block", "inject_block", "extractor_features",
                       "fc_features", "code_dim", "hidden_dim", "parser_conv_features", "parser_fc_features"}
    counts = models.param_counts(narrow)
    assert sum(counts.values()) < sum(models.param_counts(full).values()) / 100
    # Honest defaults: class weights from training generators; with one epoch there is nothing to
    # select (the last checkpoint), so no generators are spent on validation.
    assert c.train.class_weights == "train"
    default = _config()
    assert default.train.data.num_val == 0 and default.workers == 2
    assert default.train.num_epochs == 1 and default.probe and default.random_gt_seeds == (0, 1)
    # Both recipes side by side: the official one of the product and the improved ones, with
    # Random G.T. runs of the improved recipe the goal compares against.
    assert default.methods == ("adaparse", "renet", "renet:improved")
    assert default.random_gt_methods == ("renet:improved",)


def test_plan_and_train_configs(tmp_path):
    c = _config([f"--config.workdir={tmp_path}", "--config.random_gt_seeds=(0, 4)",
                 "--config.methods=('adaparse', 'renet:improved')",
                 "--config.random_gt_methods=('adaparse',)"])
    runs = demo.plan(c, ["1", "2"])
    assert [(r.arch, r.recipe, r.fold, r.random_gt_seed) for r in runs] == [
        ("adaparse", "official", "1", None), ("adaparse", "official", "2", None),
        ("renet", "improved", "1", None), ("renet", "improved", "2", None),
        ("adaparse", "official", "1", 0), ("adaparse", "official", "2", 0),
        ("adaparse", "official", "1", 4), ("adaparse", "official", "2", 4)]
    assert len({r.workdir for r in runs}) == len(runs)
    assert all(r.workdir.parent == tmp_path.resolve() / demo.RUNS_DIR for r in runs)
    assert runs[6].name == "Random G.T. (AdaParse) seed 4, fold 1"
    assert runs[2].name == "RE-Net (improved), fold 1" and runs[2].workdir.name == "renet_improved_fold1"
    assert runs[0].workdir.name == "adaparse_fold1"  # official runs keep their old names
    for run in runs:
        t = demo.train_config(c, run)
        training.validate_config(t)
        assert t.recipe == run.recipe
        if run.recipe != "official":  # the recipe's fields, then compare the rest as official
            assert t.model.fen_input == "highpass" and t.loss.ce_input == "logits"
            assert t.optimizer.learning_rate == c.recipe_train.improved.learning_rate == 3e-3
            assert t.num_epochs == c.recipe_train.improved.num_epochs == 2
            assert t.optimizer.schedule == "cosine"
            t.optimizer.learning_rate, t.num_epochs = c.train.optimizer.learning_rate, c.train.num_epochs
            for path in training.RECIPES["improved"]:
                group, field = path.split(".")
                t[group][field] = training.default_config()[group][field]
        assert t.model.arch == run.arch and t.split == int(run.fold)
        assert t.random_gt == (run.random_gt_seed is not None)
        assert t.random_gt_seed == (run.random_gt_seed or 0)
        assert t.data.dataset == str(tmp_path.resolve() / demo.ZOO_DIR)
        assert t.data.cache == str(tmp_path.resolve() / demo.CACHE_DIR)
        # Everything else is config.train, unchanged (both architectures at the same width).
        for k in ("num_epochs", "batch_size", "class_weights"):
            assert t[k] == c.train[k]
        for k in ("optimizer", "loss"):
            assert t[k].to_dict() == c.train[k].to_dict()
        assert {k: v for k, v in t.model.items() if k != "arch"} == {
            k: v for k, v in c.train.model.items() if k != "arch"}


def test_seeds_plan_one_replicate_per_training_seed(tmp_path):
    c = _config([f"--config.workdir={tmp_path}", "--config.methods=('renet:improved',)",
                 "--config.random_gt_methods=('renet:improved',)", "--config.random_gt_seeds=(0,)",
                 "--config.seeds=(0, 2)"])
    runs = demo.plan(c, ["1", "2"])
    # The runs of train.seed keep their names.
    assert [(r.workdir.name, r.seed, r.random_gt_seed) for r in runs] == [
        ("renet_improved_fold1", None, None), ("renet_improved_fold2", None, None),
        ("renet_improved_seed2_fold1", 2, None), ("renet_improved_seed2_fold2", 2, None),
        ("renet_improved_random_gt0_fold1", None, 0), ("renet_improved_random_gt0_fold2", None, 0)]
    assert [demo.train_config(c, r).seed for r in runs] == [0, 0, 2, 2, 0, 0]
    assert runs[2].name == "RE-Net (improved) training seed 2, fold 1"
    # The papers' per-fold tables take one run per method and fold: the first seed's.
    assert demo.papers_runs(c, runs) == [runs[i] for i in (0, 1, 4, 5)]
    c.seeds = (3, 0)
    assert [r.workdir.name for r in demo.papers_runs(c, demo.plan(c, ["1"]))] == [
        "renet_improved_seed3_fold1", "renet_improved_random_gt0_fold1"]
    assert [r.workdir for r in demo.plan(_config([f"--config.workdir={tmp_path}"]), ["1"])] == [
        r.workdir for r in demo.plan(_config([f"--config.workdir={tmp_path}", "--config.seeds=(0,)"]), ["1"])]
    with pytest.raises(ValueError, match="config.seeds"):
        demo.plan(_config([f"--config.workdir={tmp_path}", "--config.seeds=(1, 1)"]), ["1"])
    # A recipe's own seeds: here the improved recipe's three, the official RE-Net's one.
    c = _config([f"--config.workdir={tmp_path}", "--config.methods=('renet', 'renet:improved')",
                 "--config.random_gt_methods=()", "--config.recipe_train.improved.seeds=(0, 1, 2)"])
    assert [(r.recipe, r.seed) for r in demo.plan(c, ["1"])] == [
        ("official", None), ("improved", None), ("improved", 1), ("improved", 2)]
    assert demo.train_config(c, demo.plan(c, ["1"])[3]).seed == 2
    c.recipe_train.improved.seeds = (2, 2)
    with pytest.raises(ValueError, match=r"config.recipe_train.improved.seeds: \(2, 2\) repeats"):
        demo.plan(c, ["1"])


def test_recipe_overrides_make_a_variant_of_the_recipe_without_editing_it(tmp_path):
    base = [f"--config.workdir={tmp_path}", "--config.methods=('renet', 'renet:improved')",
            "--config.random_gt_methods=()"]
    c = _config([*base, "--config.recipe_overrides=model.parser_pool=flatten loss.constraint_scale=1"])
    assert demo.recipe_overrides(c) == ["--config.model.parser_pool=flatten", "--config.loss.constraint_scale=1"]
    official, improved = demo.plan(c, ["1"])
    t = demo.train_config(c, improved)  # the two fields, the recipe's other fields as they are
    assert (t.model.parser_pool, t.loss.constraint_scale) == ("flatten", 1.0)
    assert t.model.fen_input == "highpass" and t.optimizer.schedule == "cosine"
    training.validate_config(t)
    assert demo.train_config(_config(base), improved).model.parser_pool == "global"  # without: the recipe's
    t = demo.train_config(c, official)  # the official recipe is left alone
    assert t.to_dict() == demo.train_config(_config(base), official).to_dict()
    for bad, match in (("model.parser_pools=flatten", "did you mean .model.parser_pool."),
                       ("parser_pool", "GROUP.FIELD"),
                       ("model.parser_spectrum_heads=maybe", "parser_spectrum_heads.*maybe"),
                       ("model.width=2.5", "width=2.5")):
        with pytest.raises(ValueError, match=match):
            demo.recipe_overrides(_config([*base, f"--config.recipe_overrides={bad}"]))


def test_recipe_train_names_an_unknown_recipe_or_field(tmp_path):
    c = _config([f"--config.workdir={tmp_path}", "--config.methods=('renet:improved',)"])
    with c.unlocked():  # a locked config refuses the new key itself (ml_collections names it)
        c.recipe_train.fast = {"learning_rate": 1e-2}
    run = demo.plan(c, ["1"])[0]
    with pytest.raises(ValueError, match=r"config.recipe_train: unknown recipe\(s\) \['fast'\]"):
        demo.train_config(c, run)
    with c.unlocked():
        del c.recipe_train["fast"]
        c.recipe_train.improved.batch_size = 8
    with pytest.raises(ValueError, match=r"config.recipe_train.improved.batch_size: not a field"):
        demo.train_config(c, run)


@pytest.mark.parametrize("spec", ["adaparse:fast", "vit", "renet:"])
def test_bad_method_names_the_entry(spec):
    if spec == "renet:":  # an empty recipe is the official one
        assert demo.parse_method(spec) == ("renet", "official")
        return
    with pytest.raises(ValueError, match=f"config.methods entry '{spec}'"):
        demo.parse_method(spec)


def test_folds_come_from_the_zoo(tmp_path):
    synthetic.write_dataset(tmp_path / demo.ZOO_DIR, num_generators=6, images_per_generator=2,
                            num_splits=2, test_per_split=2)
    c = _config([f"--config.workdir={tmp_path}"])
    assert demo.folds_of(c) == ["1", "2"]
    c.folds = (2,)
    assert demo.folds_of(c) == ["2"]
    c.folds = (3,)
    with pytest.raises(ValueError, match=r"config.folds: \['3'\] are not folds"):
        demo.folds_of(c)


@pytest.mark.slow
def test_run_demo_end_to_end_on_a_micro_setting(tmp_path, monkeypatch):
    def fake_zoo(config, *, progress=True):  # the zoo's own tests build real zoos
        out = demo.zoo_dir(config)
        if not (out / "dataset.json").is_file():
            synthetic.write_dataset(out, num_generators=8, images_per_generator=16, num_splits=2,
                                    test_per_split=3)
        return {"num_generators": 8, "images_per_generator": 16, "settings_hash": "synthetic"}

    monkeypatch.setattr(demo, "build_zoo", fake_zoo)
    tiny = models.model_config("renet", size="tiny")
    c = _config([f"--config.workdir={tmp_path}", "--config.methods=('renet',)",
                 "--config.random_gt_methods=('renet',)", "--config.random_gt_seeds=(0,)",
                 "--config.n_resamples=99",
                 "--config.train.num_epochs=1", "--config.train.data.num_val=1",
                 "--config.train.data.eval_batch_size=16", "--config.train.log_every_steps=1"])
    c.train.model = tiny
    before = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir", "jax_embedded_constants_max_bytes")}
    printed = []
    out = demo.run_demo(c, progress=False, echo=printed.append)
    assert {k: jax.config.values[k] for k in before} == before  # global JAX settings restored

    runs = demo.plan(c, ["1", "2"])
    dataset = re116.load_dataset(tmp_path / demo.ZOO_DIR)
    for run in runs:
        saved = training.load_saved_config(run.workdir)
        assert saved.split == int(run.fold) and saved.random_gt == (run.random_gt_seed is not None)
        result = json.loads(next((run.workdir / "eval").glob("test_metrics_step*.json")).read_text())
        assert result["test_generators"] == list(dataset.test_splits[run.fold])
        assert len(result["val_generators"]) == 1
        assert not set(result["val_generators"]) & set(dataset.test_splits[run.fold])
    # The printed tables are the scoring of exactly these runs.
    text = "\n".join(printed)
    again = scoring.score_runs([r.workdir for r in runs], n_resamples=99)
    assert reporting.scores_markdown(again, probe=out["probe"]) in text
    assert "Random G.T. (RE-Net)" in text and scoring.BASELINE_LABEL in text
    assert "Goal" in text and "[demo] total" in text
    # The spectral probe ran on the same folds; the goal (a) line of RE-Net compares with it.
    assert set(out["probe"]) == {t.name for t in targets.DISCRETE_TARGETS}
    assert all(r["generators"] == 6 for r in out["probe"].values())
    assert reporting.PROBE_LABEL in text
    line = reporting.probe_goal_line(out["probe_goals"]["RE-Net"])
    assert line in text and line.startswith("RE-Net: Goal ")
    assert out["goals"]["RE-Net"]["random_gt"] == "Random G.T. (RE-Net)"
    goal_b = out["goals"]["RE-Net"]  # issue 12's (b), with the probe's attributes
    assert goal_b["criteria"]["min_significant"] == 3 and "probe_read" in goal_b
    assert "Goal (b): " + reporting.goal_markdown(goal_b) in text
    assert out["report"]["num_generators"] == 6  # two folds of 3 held-out generators
    files = out["files"]
    for key in ("tables", "scores_md", "scores_plot"):
        assert Path(files[key]).is_file(), key
    assert json.loads((tmp_path / demo.RESULTS_DIR / "demo.json").read_text())["zoo"]["settings_hash"] == "synthetic"

    # The probe of the runs' fingerprints: each fold's generators through the run that held it out.
    zoo = tmp_path / demo.ZOO_DIR
    official = [r.workdir for r in runs if r.random_gt_seed is None]
    by_fold = fingerprints.runs_by_fold(official)
    features = fingerprints.run_features(by_fold, zoo, dataset.names, ["upsampling"])["upsampling"]
    for fold, run in by_fold.items():
        name = dataset.names[0]
        fps = run.apply(run.variables, zoo_probe.load_images(zoo, name))["fingerprints"]
        direct = zoo_probe.spectral_features(np.asarray(fps[:, 0], np.float32))
        np.testing.assert_allclose(features[fold][name], direct, rtol=1e-4, atol=1e-4)
    assert sorted(by_fold) == ["1", "2"]
    assert diagnose_main(["--zoo", str(zoo), "--runs", *map(str, official), "--n-resamples", "99",
                          "--out", str(tmp_path / "fp")]) == 0
    saved = json.loads((tmp_path / "fp" / fingerprints.JSON).read_text())
    again = zoo_probe.probe(zoo, ["upsampling"], n_resamples=99, features={"upsampling": features})
    assert saved["fingerprints"]["upsampling"]["f1"] == again["upsampling"]["f1"]
    assert saved["images"]["upsampling"] == zoo_probe.probe(zoo, ["upsampling"], n_resamples=99)["upsampling"]
    assert all(r["generators"] == 6 for r in saved["fingerprints"].values())
    with pytest.raises(ValueError, match=r"no run holds out fold\(s\) \['2'\]"):
        fingerprints.held_out_fingerprints(zoo, official[:1], n_resamples=99)
    random_gt_fold1 = next(r.workdir for r in runs if r.random_gt_seed is not None and r.fold == "1")
    with pytest.raises(ValueError, match="both hold out fold 1"):
        fingerprints.runs_by_fold([official[0], random_gt_fold1])

    # A rerun trains nothing: same checkpoints, same metrics, same scores.
    lines = {r.workdir: (r.workdir / training.METRICS_JSONL).read_text() for r in runs}
    out2 = demo.run_demo(c, progress=False, echo=lambda s: None)
    assert all((r.workdir / training.METRICS_JSONL).read_text() == lines[r.workdir] for r in runs)
    assert out2["report"]["methods"] == out["report"]["methods"]


def test_probe_goals_of_an_ensemble_use_its_methods_references():
    names = [t.name for t in targets.DISCRETE_TARGETS]

    def method(label, f1, groups, **extra):
        return {"label": label, "random_gt": label.startswith(scoring.RANDOM_GT_PREFIX),
                "targets": {n: {"f1_generator": f1} for n in names},
                "means": {"discrete/f1_generator": f1, "groups/f1_generator": groups}, **extra}

    report = {"methods": [method("RE-Net", 0.3, 0.5), method("RE-Net (improved)", 0.6, 0.6),
                          method("RE-Net (improved), ensemble of 2", 0.9, 0.4, ensemble_of="RE-Net (improved)"),
                          method("Random G.T. (RE-Net (improved))", 0.7, 0.3)]}
    probe = {"upsampling": {"f1": 0.8, "p": 1e-4}}
    goals = demo.probe_goals(report, probe)
    g = goals["RE-Net (improved), ensemble of 2"]
    assert g["random_gt_discrete_f1"] == 0.7 and g["official_groups_f1"] == 0.5
    assert g["checks"] == {"probe": True, "upsampling": True, "random_gt": True, "groups": False}
    assert goals["RE-Net (improved)"]["checks"]["random_gt"] is False  # 0.6 < 0.7
