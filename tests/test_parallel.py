"""Data parallel: the same jitted step on 8 CPU devices equals the single-device run.

The comparison runs in a child process started with `--xla_force_host_platform_device_count=8`, so
the other tests' JAX keeps its single device. The child trains the tiny AdaParse (32 px, batch 16:
its FEN BatchNorms see 25 * 16 folded streams) for K = 2 steps, once on one device and once with
the batch split over 8 devices (`adaparse_jax.parallel`: 2 images per device, state replicated),
with the same jitted `adaparse_jax.train` step, then runs the eval step; this process compares parameters,
BatchNorm statistics, optimiser state, every loss term of every step and the eval outputs.

GSPMD sums the batch in another order (per device, then across devices), so the runs agree to
float32 rounding (~1e-6 relative), not bit for bit. Per-device BatchNorm statistics (2 images
instead of 16) would differ at the first step by far more than that.

A second child runs `training.train` (what train.py calls) on the tiny runs' dataset
(`train_runs.write_tiny_dataset`, tiny RE-Net, 4 steps of batch 16) with `config.devices` = 1 and
then the default (all 8: the device-resident loader and 2 fused steps per call, stopped by
max_steps at step 2 and resumed from its checkpoint with the grain loader), validating with
batches of 12 (and a last one of 8) that do not split over 8 devices; and tries configs whose
batch does not split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DEVICES = 8
BATCH = 16
K = 2
ROOT = Path(__file__).resolve().parents[1]


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
    import jax

    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _child(out: str) -> None:
    """Runs in the 8-device process: single-device and sharded runs of the same steps."""
    import jax
    import optax

    from adaparse_jax import models, parallel, targets
    from adaparse_jax import train as training
    from adaparse_jax.data import synthetic

    devices = jax.devices()
    assert len(devices) == DEVICES, devices
    config = training.default_config()
    config.model = models.model_config("adaparse", "tiny")
    size = config.model.image_size
    model = models.build_model(config.model)
    # SGD with momentum, not the training Adam: Adam's m / sqrt(v) turns the rounding noise of
    # gradients that are zero in exact arithmetic (biases before a BatchNorm, fc1 rows reading the
    # batch-constant code z_b) into +-lr steps, hiding the comparison's precision; the optimiser is
    # elementwise on replicated values, so only the gradients' equality is in question.
    # (The step logs the learning rate from an injected-hyperparameter state, as make_optimizer's.)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1e-3, momentum=0.9)
    labels = targets.label_matrix(synthetic.label_tables(8, seed=0))
    rng = np.random.default_rng(0)
    images = np.concatenate([synthetic.generator_images(labels[g], 2 * K, size, rng) for g in range(8)])
    generator = np.repeat(np.arange(8), 2 * K).astype(np.int32)
    order = rng.permutation(len(images))  # mix generators within each batch
    batches = [{"image": images[order[i::K]], "generator": generator[order[i::K]]} for i in range(K)]
    tables = (labels, targets.class_weights(labels))  # arguments of the step, not constants
    step = training.make_train_step(model, tx, loss_config=config.loss)
    eval_step = training.make_eval_step(model)
    # Initialised once (the step donates its input state, so each run gets its own copy), from the
    # state's shapes with scaled random values: compiling `init_state` would take longer than the test.
    shapes = training.state_shapes(model, tx, (size, size, 3))
    init_rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return (scale * init_rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if ("'scale'" in name or "'var'" in name) else 0.0, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes.params)
    init = training.TrainState(step=np.zeros((), np.int32), params=params,
                                batch_stats=jax.tree_util.tree_map_with_path(fill, shapes.batch_stats),
                                opt_state=jax.device_get(tx.init(params)), rng=jax.random.key(0))

    def run(place_state, place_batch):
        state = place_state(jax.tree.map(lambda x: x.copy(), init))
        metrics = []
        for batch in batches:
            state, m = step(state, place_batch(batch), *tables)
            metrics.append(m)
        return state, metrics, eval_step(training.variables_of(state), place_batch(batches[0]))

    one = devices[0]
    single = run(lambda s: jax.device_put(s, one), lambda b: jax.device_put(b, one))
    mesh = parallel.data_mesh()
    multi = run(lambda s: parallel.replicate(s, mesh), lambda b: parallel.shard_batch(b, mesh))

    # The batches really are split: each device holds BATCH / 8 images of a step; the [K, B, ...]
    # batches of fused steps are split on their second axis.
    stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
    shapes = [parallel.shard_batch(batches[0], mesh)["image"],
              parallel.shard_batch(stacked, mesh, fused_steps=K)["image"]]
    facts = {
        "shard_shapes": [list(x.sharding.shard_shape(x.shape)) for x in shapes],
        "state_devices": len(multi[0].params["fen"]["shared"]["stem"]["kernel"].sharding.device_set),
        "state_replicated": all(x.sharding.is_fully_replicated
                                for x in jax.tree_util.tree_leaves(multi[0])),
        "single_devices": len(single[0].params["fen"]["shared"]["stem"]["kernel"].sharding.device_set),
        "loss_total": float(single[1][0]["train/loss/total"]),
    }
    arrays = _flat(init.params, "init/params")
    for name, (state, metrics, outputs) in (("single", single), ("multi", multi)):
        state = jax.device_get(state)
        for part in ("params", "batch_stats", "opt_state"):
            arrays.update(_flat(getattr(state, part), f"{name}/{part}"))
        for i, m in enumerate(metrics, start=1):
            arrays.update(_flat(jax.device_get(m), f"{name}/metrics{i}"))
        arrays.update(_flat(jax.device_get(outputs), f"{name}/eval"))
        arrays[f"{name}/step"] = np.asarray(state.step)
    np.savez(Path(out) / "runs.npz", **arrays)
    (Path(out) / "facts.json").write_text(json.dumps(facts))


def _train_child(out: str) -> None:
    """Runs in the 8-device process: train_and_evaluate on 1 device, then on all 8."""
    import logging

    from train_runs import CONFIG, write_tiny_dataset

    from adaparse_jax import evaluation
    from adaparse_jax import train as training

    logging.getLogger("adaparse_jax").setLevel(logging.INFO)  # train.log as under train.py
    out = Path(out)
    ds_path = write_tiny_dataset(out)
    # 8 generators: 2 test, 2 validation (32 images: eval batches of 12, 12 and 8), 4 training
    # ones (64 images: 4 steps of 16 per epoch). The official learning rate, not tiny's 1e-3: Adam
    # turns the rounding noise of gradients that are zero in exact arithmetic into +-lr steps.
    common = [f"--config.data.dataset={ds_path.parent}", f"--config.data.cache={out / 'cache'}",
              "--config.progress=False", "--config.tensorboard=False", "--config.num_epochs=1",
              "--config.log_every_steps=1", "--config.data.num_val=2", "--config.data.eval_batch_size=12",
              "--config.optimizer.learning_rate=1e-4"]

    def train(workdir: str, *overrides: str) -> dict:
        config = training.load_config(CONFIG, [*common, *overrides])
        return training.train(config, out / workdir)

    errors = {}
    for name, overrides in (("batch_12", ["--config.batch_size=12"]),
                            ("devices_3", ["--config.devices=3"]),
                            ("devices_9", ["--config.devices=9"])):
        try:
            train(name, *overrides)
        except ValueError as e:
            errors[name] = {"type": type(e).__name__, "message": str(e),
                            "workdir_made": (out / name).exists()}
    train("one", "--config.devices=1", "--config.eval_at_end=False")
    train("all", "--config.data.loader=device", "--config.fused_steps=2", "--config.max_steps=2")
    summary = train("all", "--config.data.loader=grain", "--config.fused_steps=2", "--config.devices=8")
    assert summary["finished"]
    evaluation.evaluate_run(summary["workdir"])  # what train.py does next (eval_at_end)
    (out / "errors.json").write_text(json.dumps(errors))


def _run_child(kind: str, out: Path) -> None:
    """Run `_child` and/or `_train_child` (kind: 'steps', 'train' or 'steps,train') in one process
    whose CPU backend has DEVICES devices."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    # Identical programs (the two halves of the resumed run) are compiled once.
    env["JAX_COMPILATION_CACHE_DIR"] = str(out / "xla")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, kind, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child process failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def child_out(tmp_path_factory) -> Path:
    """Both children's outputs, from one process (one JAX start-up and model compile fewer)."""
    out = tmp_path_factory.mktemp("parallel")
    _run_child("steps,train", out)
    return out


@pytest.fixture(scope="module")
def runs(child_out):
    out = child_out
    with np.load(out / "runs.npz") as f:
        arrays = dict(f)
    return arrays, json.loads((out / "facts.json").read_text())


@pytest.mark.slow
def test_batch_is_split_and_state_replicated(runs):
    _, facts = runs
    per_device = BATCH // DEVICES
    assert facts["shard_shapes"][0][0] == per_device  # plain step: [B, ...] split on axis 0
    assert facts["shard_shapes"][1][:2] == [K, per_device]  # fused: [K, B, ...] split on axis 1
    assert facts["state_devices"] == DEVICES and facts["state_replicated"]
    assert facts["single_devices"] == 1
    assert np.isfinite(facts["loss_total"])


@pytest.mark.slow
def test_sharded_run_equals_single_device_run(runs):
    arrays, _ = runs
    single = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("single/")}
    multi = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("multi/")}
    init = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("init/")}
    assert single.keys() == multi.keys() and init
    assert int(single["step"]) == int(multi["step"]) == K
    # Parameters are compared by what the steps changed, against the scale of the whole group's
    # changes: a bias in front of a BatchNorm has a zero gradient in exact arithmetic (pure rounding
    # noise), and the gradients of BatchNorm'd layers come from cancelling sums, so single elements
    # differ by up to ~1e-4 of the largest change; a wrong sharding (per-device BatchNorm
    # statistics, a batch seen twice) changes them by O(1).
    single.update({n: single[n] - init[n] for n in init})
    multi.update({n: multi[n] - init[n] for n in init})
    groups = ("params", "batch_stats", "opt_state", "metrics", "eval")
    scale = {g: max(float(np.abs(v).max()) for n, v in single.items()
                    if n.startswith(g) and v.dtype.kind == "f") for g in groups}
    assert all(scale.values()), scale  # every group has values, and the steps moved the parameters
    for name, a in single.items():
        b = multi[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype.kind in "iub":
            np.testing.assert_array_equal(b, a, err_msg=name)
            continue
        group = next((g for g in groups if name.startswith(g)), None)
        # Loss terms of every step: tight. The rest is measured against its group's scale, since
        # the second step starts from parameters that already differ by rounding.
        rtol = 1e-4 if "/loss/" in name else 1e-3
        atol = {"params": 1e-3, "opt_state": 1e-3, "batch_stats": 1e-4}.get(group, 1e-5) * (
            scale[group] if group in ("params", "opt_state", "batch_stats") else 1.0)
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def trained(child_out):
    return child_out


def _metrics(workdir: Path, prefix: str) -> dict[int, dict[str, float]]:
    """{step: {name: value}} of a run's metrics named `prefix`..."""
    from adaparse_jax import train as training

    out: dict[int, dict[str, float]] = {}
    for record in training.read_metrics(workdir):
        out.setdefault(record["step"], {}).update(
            {k: v for k, v in record.items() if k.startswith(prefix)})
    return {step: values for step, values in out.items() if values}


def _temp_mib(workdir: Path) -> list[float]:
    """Compiled temporary memory of the train step, from each compile line of train.log."""
    import re

    return [float(m) for m in re.findall(r"compiled in .*temp ([0-9.]+) MiB",
                                         (workdir / "train.log").read_text())]


@pytest.mark.slow
def test_train_and_evaluate_on_8_devices_gives_the_1_device_losses(trained):
    one, all8 = _metrics(trained / "one", "train/loss/"), _metrics(trained / "all", "train/loss/")
    assert sorted(one) == sorted(all8) == [1, 2, 3, 4]
    for step, terms in one.items():
        assert terms.keys() == all8[step].keys() and len(terms) > 20
        for name, value in terms.items():
            np.testing.assert_allclose(all8[step][name], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"step {step} {name}")
    # Validation on the replicated state, with batches that do not split over the devices.
    val_one, val_all = _metrics(trained / "one", "val/l1/"), _metrics(trained / "all", "val/l1/")
    assert list(val_one) == list(val_all) == [4] and len(val_one[4]) == 11  # 9 targets, mean, std
    for name, value in val_one[4].items():
        np.testing.assert_allclose(val_all[4][name], value, rtol=1e-4, err_msg=name)
    log = (trained / "all" / "train.log").read_text()
    assert log.count("data parallel over 8 cpu device(s) of 1 process(es): batch 16, 2 per device") == 2
    assert "resumed from checkpoint step 2" in log
    assert "data parallel over 1 cpu device(s) of 1 process(es): batch 16, 16 per device" in (
        trained / "one" / "train.log").read_text()
    # The batch really is split: each device's compiled step holds a fraction of the activations.
    (temp_one,), temp_all = _temp_mib(trained / "one"), _temp_mib(trained / "all")
    assert len(temp_all) == 2 and max(temp_all) < temp_one / 2, (temp_one, temp_all)


@pytest.mark.slow
def test_checkpoint_of_the_8_device_run_restores_on_one_device(trained):
    import jax

    from adaparse_jax import checkpointing, models
    from adaparse_jax import train as training

    states = {}
    for name in ("one", "all"):
        config = training.load_saved_config(trained / name)
        abstract = training.state_shapes(models.build_model(config.model),
                                          training.make_optimizer(config), (32, 32, 3))
        with checkpointing.Checkpointer(trained / name / "checkpoints") as ckpt:
            states[name], loader_state, _ = ckpt.restore(abstract, 4, model_config=config.model.to_dict())
        assert (loader_state["epoch"], loader_state["step"]) == (1, 0)
    leaves = jax.tree_util.tree_leaves(states["all"])
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in leaves)
    assert int(states["all"].step) == 4
    one, all8 = (_flat(states[n].params, "params") for n in ("one", "all"))
    assert one.keys() == all8.keys()
    for name, a in one.items():
        # The gradient of a conv bias in front of a BatchNorm is zero but for rounding, and Adam
        # turns that noise into steps of +-lr: the runs may differ there by 2 * lr * 4 steps.
        in_front_of_bn = name.startswith("params['fen']['block") and name.endswith("['conv']['bias']")
        np.testing.assert_allclose(all8[name], a, rtol=1e-3, atol=8e-4 if in_front_of_bn else 1e-5,
                                   err_msg=name)
    # The test pass after training (train.py's evaluate_run) restored it on one device too.
    result = json.loads((trained / "all" / "eval" / "test_metrics_step4.json").read_text())
    assert result["step"] == 4 and np.isfinite(result["metrics"]["l1/continuous_mean"])


@pytest.mark.slow
def test_batch_size_that_does_not_split_over_the_devices_is_a_config_error(trained):
    errors = json.loads((trained / "errors.json").read_text())
    assert errors["batch_12"]["message"].startswith(
        "batch_size=12 does not split over 8 devices; use a multiple of 8 (config field batch_size)")
    assert "devices=0: all 8" in errors["batch_12"]["message"]
    assert errors["devices_3"]["message"].startswith("batch_size=16 does not split over 3 devices")
    assert "devices=3: the first 3" in errors["devices_3"]["message"]
    assert errors["devices_9"]["message"].startswith("config field devices=9; expected at most the 8 cpu")
    for e in errors.values():
        assert e["type"] == "ConfigError" and not e["workdir_made"]  # refused before anything is written


def test_more_devices_than_present_is_a_config_error():
    import jax

    from adaparse_jax import train as training

    config = training.default_config()
    config.devices = len(jax.devices()) + 1
    with pytest.raises(training.ConfigError, match=rf"devices={config.devices}; expected at most"):
        training.validate_config(config)
    config.devices = 0
    training.validate_config(config)
    assert training.data_mesh(config).size == len(jax.devices())


if __name__ == "__main__":
    for _kind in sys.argv[1].split(","):
        {"steps": _child, "train": _train_child}[_kind](sys.argv[2])
