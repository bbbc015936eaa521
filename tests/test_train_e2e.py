"""train.py end to end on a tiny generated dataset: kill and resume, bit-identical losses, metrics,
checkpoints, model selection, clear errors (config typo, another model's checkpoint, NaN loss),
Random G.T. labels."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest
from train_runs import CONFIG, CRASH_STEP, STEPS_PER_EPOCH, tiny_runs, train

from adaparse_jax import checkpointing, evaluation, losses, models, targets
from adaparse_jax import train as training

pytestmark = pytest.mark.slow

TOTAL = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


def _config(runs, *overrides):
    return training.load_config(CONFIG, [*runs["common"][2:], *overrides])


def _train_records(workdir):
    return [r for r in training.read_metrics(workdir) if "train/loss/total" in r]


def _leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.replace(rng=jax.random.key_data(state.rng)))]


def _best(workdir):
    return checkpointing.selected_step(workdir)[0]


def _restore(workdir, step):
    config = training.load_saved_config(workdir)
    model = models.build_model(config.model)
    abstract = training.state_shapes(model, training.make_optimizer(config), (32, 32, 3))
    with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore(abstract, step, model_config=config.model.to_dict())


def test_killed_run_resumes_with_bit_identical_losses(runs):
    crash = runs["B_crash"]
    assert crash["returncode"] == -9  # SIGKILL: no cleanup ran
    # Checkpoints every 3 steps and at the epoch end (5): the latest one before the kill is step 6.
    assert max(crash["checkpoints"]) == 6
    assert max(r["step"] for r in crash["metrics"]) <= CRASH_STEP
    a, b = _train_records(runs["A"]), _train_records(runs["B"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, TOTAL + 1))
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("train/loss/", "train/grad_norm", "train/lr")):
                assert ra[key] == rb[key], (ra["step"], key)  # exact, not approximately
    val_a = [r for r in training.read_metrics(runs["A"]) if "val/score" in r]
    val_b = [r for r in training.read_metrics(runs["B"]) if "val/score" in r]
    assert val_a == val_b and [r["step"] for r in val_a] == [STEPS_PER_EPOCH, TOTAL]
    state_a, loader_a, _ = _restore(runs["A"], TOTAL)
    state_b, loader_b, _ = _restore(runs["B"], TOTAL)
    assert loader_a == loader_b
    for x, y in zip(_leaves(state_a), _leaves(state_b)):
        np.testing.assert_array_equal(x, y)
    pa = np.load(runs["A"] / "eval" / f"test_predictions_step{_best(runs['A'])}.npz")
    pb = np.load(runs["B"] / "eval" / f"test_predictions_step{_best(runs['B'])}.npz")
    assert pa.files == pb.files
    for k in pa.files:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_max_steps_stops_and_a_rerun_continues(runs):
    assert "stopped at step 4 of 10" in runs["C_stopped"].stdout
    assert runs["C_stopped_checkpoints"][-1] == 4
    assert not runs["C_eval_after_stop"]  # an unfinished run is not evaluated
    assert "finished at step 10 of 10" in runs["C_out"].stdout
    assert [r["step"] for r in _train_records(runs["C"])] == list(range(1, TOTAL + 1))


def test_metrics_jsonl_holds_every_loss_term_lr_and_throughput(runs):
    records = _train_records(runs["A"])
    terms = set(losses.CONSTRAINT_TERMS) | {"continuous", "total"} | {
        t.name for t in targets.CLASSIFICATION_TARGETS}
    for r in records:
        assert {f"train/loss/{t}" for t in terms} <= set(r)
        assert r["train/lr"] == pytest.approx(1e-3)  # configs/tiny.py
        assert r["train/img_per_s"] > 0
        assert math.isfinite(r["train/loss/total"])
        assert r["epoch"] == (r["step"] - 1) // STEPS_PER_EPOCH
        parts = sum(r[f"train/loss/{t}"] for t in terms - {"total"})
        assert parts == pytest.approx(r["train/loss/total"], rel=1e-5)
    log = (runs["A"] / "train.log").read_text()
    assert "parameters" in log and "compiled in" in log and "memory:" in log


def test_config_and_checkpoint_contents_are_saved(runs):
    saved = training.load_saved_config(runs["A"])
    assert saved.model.arch == "renet" and saved.split == 1 and saved.num_epochs == 2
    assert saved.data.cache == str(runs["cache"].resolve())
    state, loader_state, meta = _restore(runs["A"], TOTAL)
    assert int(state.step) == TOTAL
    assert (loader_state["epoch"], loader_state["step"]) == (2, 0)
    assert meta["model"]["width"] == saved.model.width and meta["label"] == "RE-Net"
    assert training.learning_rate(state.opt_state) == pytest.approx(1e-3)


def test_model_selection_uses_validation_generators_only(runs):
    sel = checkpointing.read_selection(runs["A"])
    history = {h["step"]: h["value"] for h in sel["history"]}
    assert sorted(history) == [STEPS_PER_EPOCH, TOTAL]
    assert sel["best_value"] == max(history.values()) and history[sel["best_step"]] == sel["best_value"]
    val = [r for r in training.read_metrics(runs["A"]) if "val/score" in r]
    assert {r["step"]: r["val/score"] for r in val} == history
    steps = sorted(int(p.name) for p in (runs["A"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == sorted({TOTAL, sel["best_step"]})  # the last one (keep=1) and the best one
    result = json.loads((runs["A"] / "eval" / f"test_metrics_step{sel['best_step']}.json").read_text())
    assert result["step"] == sel["best_step"] and "validation" in result["selection"]
    assert not set(result["val_generators"]) & set(result["test_generators"])
    assert result["test_generators"] == ["SYN_00", "SYN_01"]
    # The validation score is recomputed from the validation predictions' metrics definition.
    last_val = val[-1]
    assert last_val["val/score"] == pytest.approx(training.selection_score(
        {k.removeprefix("val/"): v for k, v in last_val.items() if k.startswith("val/")}))


def test_config_typo_is_an_error_listing_valid_fields(runs):
    done = train(["--config", CONFIG, "--workdir", str(runs["root"] / "typo"), "--config.modle.width=4"],
                 runs["env"], check=False)
    assert done.returncode == 2
    assert "unknown config field 'modle'" in done.stderr and "did you mean 'model'" in done.stderr
    assert "valid fields of config:" in done.stderr and "batch_size" in done.stderr
    assert not (runs["root"] / "typo").exists()
    config = _config(runs)
    config.unlock()
    config.batchsize = 8
    with pytest.raises(training.ConfigError, match="unknown config field 'batchsize'.*batch_size"):
        training.validate_config(config)


def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    other = _config(runs, "--config.model.width=4")
    with pytest.raises(training.ConfigError, match=r"different model(?s:.*)model\.width: saved 8, now 4"):
        training.train(other, runs["A"])
    # Without the saved config (checkpoints copied elsewhere) the checkpoint's own record refuses it.
    shutil.copytree(runs["A"] / "checkpoints", tmp_path / "copy" / "checkpoints")
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"model\.width: checkpoint 8, config 4"):
        training.train(other, tmp_path / "copy")
    # And without any record, the parameter shapes are compared.
    abstract = training.state_shapes(models.build_model(other.model), training.make_optimizer(other),
                                      (32, 32, 3))
    with checkpointing.Checkpointer(runs["A"] / "checkpoints") as ckpt:
        with pytest.raises(checkpointing.CheckpointMismatchError,
                           match=r"does not fit this model(?s:.*)\n  params/fen/\S+: checkpoint "
                                 r"\([0-9, ]*8\), model \([0-9, ]*4\)"):
            ckpt.check_compatible(TOTAL, abstract, model_config=None)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(runs):
    workdir = runs["root"] / "nan"
    done = train(runs["common"] + [f"--workdir={workdir}", "--config.optimizer.learning_rate=1e30",
                                   "--config.checkpoint_every_steps=1"], runs["env"], check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    import re

    m = re.search(r"non-finite loss at step (\d+) \(epoch \d+\): (\w+)=(nan|inf|-inf)", done.stderr)
    assert m, done.stderr[-2000:]
    bad = int(m.group(1))
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == bad - 1  # every step before was saved, the bad one never
    assert f"last good checkpoint is step {bad - 1}" in done.stderr
    state, _, _ = _restore(workdir, bad - 1)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state.params))


def test_random_gt_permutes_training_labels_only(runs):
    config = _config(runs, "--config.random_gt=True", "--config.random_gt_seed=3")
    config = training.resolve_paths(config, runs["root"] / "rgt")
    true = training.setup_data(_config_resolved(runs))
    rgt = training.setup_data(config)
    ds, split = rgt.dataset, rgt.split
    train_rows = ds.rows(split.train)
    other = ds.rows(split.val + split.test)
    np.testing.assert_array_equal(rgt.train_labels[other], ds.labels[other])
    moved = rgt.train_labels[train_rows]
    # a permutation of the training rows among themselves, not the identity
    assert sorted(map(tuple, moved)) == sorted(map(tuple, ds.labels[train_rows]))
    assert not np.array_equal(moved, ds.labels[train_rows])
    np.testing.assert_array_equal(
        training.random_gt_labels(ds.labels, train_rows, 3), rgt.train_labels)  # seeded
    for name, w in true.class_weights.items():  # official weights count all rows: unchanged
        np.testing.assert_array_equal(w, rgt.class_weights[name])
    assert training.run_label(config) == "Random G.T. (RE-Net)"
    honest = training.setup_data(training.resolve_paths(
        _config(runs, "--config.class_weights=train"), runs["root"] / "w"))
    np.testing.assert_array_equal(
        honest.class_weights["normalization"],
        targets.class_weights(ds.labels, train_rows)["normalization"])


def _config_resolved(runs):
    return training.resolve_paths(_config(runs), runs["root"] / "plain")


def test_final_evaluation_reuses_nothing_from_test_for_selection(runs):
    # The summary line names the selected (validation) checkpoint and the headline test numbers.
    out = runs["A_out"].stdout
    sel = checkpointing.read_selection(runs["A"])
    assert f"checkpoint step {sel['best_step']} (best by validation score" in out
    result = evaluation.evaluate_run(runs["A"])
    assert f"F1 flags {result['metrics']['f1/flags_mean']:.3f}" in out
