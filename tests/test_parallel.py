"""Data parallel: the same jitted step on 8 CPU devices equals the single-device run.

The comparison runs in a child process started with `--xla_force_host_platform_device_count=8`, so
the other tests' JAX keeps its single device. The child trains the tiny AdaParse (32 px, batch 16:
its FEN BatchNorms see 25 * 16 folded streams) for K = 2 steps, once on one device and once with
the batch split over 8 devices (`adaparse_jax.parallel`: 2 images per device, state replicated),
with the same jitted `train_lib` step, then runs the eval step; this process compares parameters,
BatchNorm statistics, optimiser state, every loss term of every step and the eval outputs.

GSPMD sums the batch in another order (per device, then across devices), so the runs agree to
float32 rounding (~1e-6 relative), not bit for bit. Per-device BatchNorm statistics (2 images
instead of 16) would differ at the first step by far more than that.
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


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
    import jax

    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _child(out: str) -> None:
    """Runs in the 8-device process: single-device and sharded runs of the same steps."""
    import jax
    import optax

    from adaparse_jax import models, parallel, targets, train_lib
    from adaparse_jax.data import synthetic

    devices = jax.devices()
    assert len(devices) == DEVICES, devices
    config = train_lib.default_config()
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
    kw = dict(label_table=labels, class_weights=targets.class_weights(labels), loss_config=config.loss)
    step = train_lib.make_train_step(model, tx, **kw)
    eval_step = train_lib.make_eval_step(model)
    # Initialised once (the step donates its input state, so each run gets its own copy), from the
    # state's shapes with scaled random values: compiling `init_state` would take longer than the test.
    shapes = train_lib.state_shapes(model, tx, (size, size, 3))
    init_rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return (scale * init_rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if ("'scale'" in name or "'var'" in name) else 0.0, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes.params)
    init = train_lib.TrainState(step=np.zeros((), np.int32), params=params,
                                batch_stats=jax.tree_util.tree_map_with_path(fill, shapes.batch_stats),
                                opt_state=jax.device_get(tx.init(params)), rng=jax.random.key(0))

    def run(place_state, place_batch):
        state = place_state(jax.tree.map(lambda x: x.copy(), init))
        metrics = []
        for batch in batches:
            state, m = step(state, place_batch(batch))
            metrics.append(m)
        return state, metrics, eval_step(state, place_batch(batches[0]))

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"child process failed:\n{proc.stdout}\n{proc.stderr}"
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


if __name__ == "__main__":
    _child(sys.argv[1])
