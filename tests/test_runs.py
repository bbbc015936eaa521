"""`adaparse_jax.load` on the tiny runs of train_runs.py: a fresh process loads a run and uses
`run.apply` inside its own `jax.jit`, reproducing the evaluation's saved predictions; params-only
restore (the optimiser config may change); one-line errors for bad workdirs, steps and images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_runs import ROOT, STEPS_PER_EPOCH, tiny_runs

import adaparse_jax
from adaparse_jax import checkpointing, evaluation, targets

pytestmark = pytest.mark.slow

USER_CODE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import adaparse_jax
from adaparse_jax.data.cache import Cache

workdir, cache_dir, paths, out = sys.argv[1:]
run = adaparse_jax.load(workdir)
cache = Cache(cache_dir)
index = {p: i for i, p in enumerate(cache.paths)}
images = cache.read([index[p] for p in json.loads(paths)])

@jax.jit
def user_fn(variables, images):  # the caller's own jitted code around run.apply
    outputs = run.apply(variables, images)
    return outputs["continuous"], {k: v for k, v in outputs["probs"].items()}

continuous, probs = user_fn(run.variables, jnp.asarray(images))
np.savez(out, continuous=np.asarray(continuous), step=run.step,
         **{f"prob_{k}": np.asarray(v) for k, v in probs.items()})
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


def _saved_predictions(runs):
    step, _ = checkpointing.selected_step(runs["A"])
    return step, evaluation.load_predictions(runs["A"] / "eval" / f"test_predictions_step{step}.npz")


def test_load_in_a_fresh_process_inside_the_callers_jit_equals_the_evaluation(runs, tmp_path):
    step, saved = _saved_predictions(runs)
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-c", USER_CODE, str(runs["A"]), str(runs["cache"]),
         json.dumps([str(p) for p in saved["paths"]]), str(out)],
        cwd=ROOT, env=runs["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    assert int(got["step"]) == step  # the selected (best by validation) checkpoint
    np.testing.assert_allclose(got["continuous"], saved["continuous"], rtol=1e-5, atol=1e-6)
    for t in targets.CLASSIFICATION_TARGETS:
        np.testing.assert_allclose(got[f"prob_{t.name}"], saved[f"prob/{t.name}"], rtol=1e-5, atol=1e-6)


def test_parse_and_vmap_match_apply(runs):
    run = adaparse_jax.load(runs["A"], step=2 * STEPS_PER_EPOCH)
    assert run.step == 2 * STEPS_PER_EPOCH and set(run.variables) == {"params", "batch_stats"}
    assert run.spec.targets is targets and run.spec.image_size == 32
    size = run.spec.image_size
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    parsed = run.parse(images)
    direct = run.apply(run.variables, images)
    np.testing.assert_allclose(parsed["continuous"], np.asarray(direct["continuous"]), rtol=1e-5, atol=1e-6)
    for t in targets.CLASSIFICATION_TARGETS:
        np.testing.assert_array_equal(parsed[t.name], np.argmax(np.asarray(direct["probs"][t.name]), -1))
    # vmap over single images ([1, S, S, 3] each) gives the batch's outputs.
    one = jax.vmap(lambda x: run.apply(run.variables, x[None])["continuous"][0])(images)
    np.testing.assert_allclose(np.asarray(one), parsed["continuous"], rtol=1e-4, atol=1e-5)


def test_load_needs_no_optimizer_state_from_the_config(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs["A"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["optimizer"] = {"name": "not-an-optimizer"}  # could not even be built
    (copy / "config.json").write_text(json.dumps(config))
    a, b = adaparse_jax.load(runs["A"]), adaparse_jax.load(copy)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        adaparse_jax.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        adaparse_jax.load(tmp_path / "empty")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(runs["A"] / "config.json", untrained / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        adaparse_jax.load(untrained)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 999 .*steps: \["):
        adaparse_jax.load(runs["A"], step=999)
    run = adaparse_jax.load(runs["A"])
    floats = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"expected uint8 \[B, 32, 32, 3\].*got float32 \[2, 32, 32, 3\]"):
        run.parse(floats)
    with pytest.raises(ValueError, match="got float32"):
        jax.jit(run.apply)(run.variables, floats)
    with pytest.raises(ValueError, match=r"got uint8 \[2, 3, 32, 32\]"):
        run.apply(run.variables, np.zeros((2, 3, 32, 32), np.uint8))  # CHW
    with pytest.raises(ValueError, match=r"got uint8 \[2, 16, 16, 3\]"):
        run.parse(np.zeros((2, 16, 16, 3), np.uint8))
