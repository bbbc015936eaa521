"""The jitted train step: torch-style Adam, fused steps, fitting a fixed batch, dropout keys, BatchNorm.

Runs the tiny RE-Net (32 px) on a fixed batch of generated images whose fingerprints depend on
their labels (`data.synthetic`); one compiled single step and one compiled fused step are shared by
the tests of this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaparse_jax import models, targets
from adaparse_jax import train as training
from adaparse_jax.data import synthetic

PREDICTION_TERMS = ("continuous",) + tuple(t.name for t in targets.CLASSIFICATION_TARGETS)


def _with_lr(state, lr):
    hyper = dict(state.opt_state.hyperparams, learning_rate=jnp.float32(lr))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def _prediction_loss(m) -> float:
    return float(sum(m[f"train/loss/{k}"] for k in PREDICTION_TERMS))


@pytest.fixture(scope="module")
def setup():
    config = training.default_config()
    config.model = models.model_config("renet", "tiny")
    model = models.build_model(config.model)
    tx = training.make_optimizer(config)
    labels = targets.label_matrix(synthetic.label_tables(8, seed=0))
    rng = np.random.default_rng(0)
    images = np.concatenate([synthetic.generator_images(labels[g], 2, 32, rng) for g in range(8)])
    batch = {"image": jnp.asarray(images), "generator": jnp.asarray(np.repeat(np.arange(8), 2), jnp.int32)}
    kw = dict(loss_config=config.loss, donate=False)
    tables = (jnp.asarray(labels), {k: jnp.asarray(v) for k, v in targets.class_weights(labels).items()})
    state = training.init_state(model, tx, jax.random.key(0), (32, 32, 3))
    compiled = training.make_train_step(model, tx, **kw).lower(state, batch, *tables).compile()

    def step(state, batch):  # the label table and class weights are arguments of the executable
        return compiled(state, batch, *tables)

    return {"config": config, "model": model, "tx": tx, "labels": labels, "batch": batch, "kw": kw,
            "tables": tables, "state": state, "step": step}


def test_weight_decay_is_added_to_the_gradient_as_torch_adam_does():
    """Three optimiser steps against a NumPy transcription of torch.optim.Adam(weight_decay=wd)."""
    config = training.default_config()
    config.optimizer.weight_decay = 0.1  # large, so that the decay term clearly matters
    tx = training.make_optimizer(config)
    o = config.optimizer
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]

    p, state = {k: jnp.asarray(v) for k, v in params.items()}, None
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)

    ref = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads, start=1):
        for k in ref:
            d = g[k] + o.weight_decay * ref[k]  # torch: grad = grad + weight_decay * param
            m[k] = o.b1 * m[k] + (1 - o.b1) * d
            v2[k] = o.b2 * v2[k] + (1 - o.b2) * d * d
            m_hat, v_hat = m[k] / (1 - o.b1 ** t), v2[k] / (1 - o.b2 ** t)
            ref[k] = ref[k] - o.learning_rate * m_hat / (np.sqrt(v_hat) + o.eps)
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-6, atol=1e-7)
    # AdamW (decoupled decay) would differ by far more than the tolerance:
    decoupled = params["w"] - o.learning_rate * o.weight_decay * params["w"] * 3
    assert not np.allclose(np.asarray(p["w"]) - decoupled, 0, atol=1e-7)


@pytest.mark.parametrize("unroll", [1, True], ids=["rolled", "unrolled"])
def test_fused_steps_equal_single_steps(setup, unroll):
    k = 3
    s = setup
    fused = training.make_train_step(s["model"], s["tx"], fused_steps=k, unroll=unroll, **s["kw"])
    batches = [{"image": jnp.roll(s["batch"]["image"], i, axis=0),
                "generator": jnp.roll(s["batch"]["generator"], i, axis=0)} for i in range(k)]
    state, singles = s["state"], []
    for b in batches:
        state, m = s["step"](state, b)
        singles.append(m)
    fstate, fm = fused(s["state"], jax.tree.map(lambda *x: jnp.stack(x), *batches), *s["tables"])
    assert int(fstate.step) == int(state.step) == k
    # The scan body is compiled apart from the single step, so float rounding differs slightly.
    # Adam's first steps move every parameter by about +-lr whatever the gradient's size, so where
    # the true gradient is zero (a convolution bias right before BatchNorm) the rounding noise's
    # sign decides, and such a parameter may differ by up to 2 lr per step. All others agree.
    lr = s["config"].optimizer.learning_rate
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(fstate.params)])
    np.testing.assert_allclose(b, a, rtol=0, atol=2 * k * lr)
    assert np.mean(np.abs(b - a) > 1e-6 + 1e-5 * np.abs(a)) < 0.01
    for a, b in zip(jax.tree_util.tree_leaves(state.batch_stats), jax.tree_util.tree_leaves(fstate.batch_stats)):
        # running means include those biases (times 1 - momentum)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2 * k * lr)
    for i, m in enumerate(singles):
        for name, v in m.items():
            np.testing.assert_allclose(np.asarray(fm[name][i]), np.asarray(v), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} at fused step {i}")


def _fit(step, state, batch, steps=100):
    state = _with_lr(state, 3e-3)  # a short run: faster than the official 1e-4
    history = []
    for _ in range(steps):
        state, m = step(state, batch)
        history.append(m)
    history = jax.device_get(history)
    norms = np.array([m["train/grad_norm"] for m in history])
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    assert np.all(np.isfinite([m["train/loss/total"] for m in history]))
    assert all(float(m["train/lr"]) == pytest.approx(3e-3) for m in history)
    first = _prediction_loss(history[0])
    return first, np.mean([_prediction_loss(m) for m in history[-10:]])


def test_fixed_batch_is_fitted_and_gradients_stay_finite(setup):
    """The official recipe fits a fixed batch slowly (its parser starts nearly constant: issue 12's
    diagnosis); the improved recipe (`training.recipes.RECIPES['improved']`) fast."""
    s = setup
    first, last = _fit(s["step"], s["state"], s["batch"])
    assert last < 0.95 * first, (first, last)  # measured at c251a39: 153.5 -> 135.8 (0.88x)

    config = training.default_config()
    config.model = models.model_config("renet", "tiny")
    training.recipes.apply_recipe(config, "improved")
    model = models.build_model(config.model)
    tx = training.make_optimizer(config)
    step = training.make_train_step(model, tx, loss_config=config.loss, donate=False)
    state = training.init_state(model, tx, jax.random.key(0), (32, 32, 3))
    first, last = _fit(lambda st, b: step(st, b, *s["tables"]), state, s["batch"], steps=40)
    assert last < 0.05 * first, (first, last)  # 100 steps with the per-channel spectral branch: 177.0 -> 0.03


def test_dropout_key_is_folded_in_per_step(setup):
    """With a zero learning rate only the dropout mask changes between steps on one batch."""
    s = setup
    state0 = _with_lr(s["state"], 0.0)
    state1, m0 = s["step"](state0, s["batch"])
    _, m1 = s["step"](state1, s["batch"])
    for a, b in zip(jax.tree_util.tree_leaves(state0.params), jax.tree_util.tree_leaves(state1.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing learned
    assert float(m0["train/loss/total"]) != float(m1["train/loss/total"])
    # Same step number, same key: the step-1 state with its step counter reset reproduces step 0.
    _, m0_again = s["step"](state1.replace(step=state0.step), s["batch"])
    assert float(m0_again["train/loss/total"]) == float(m0["train/loss/total"])


def test_batchnorm_statistics_are_those_of_the_training_forward(setup):
    s = setup
    state = s["state"]
    new_state, _ = s["step"](state, s["batch"])
    from adaparse_jax.data import pipeline

    _, updates = jax.jit(lambda v, x, k: s["model"].apply(
        v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]))(
        {"params": state.params, "batch_stats": state.batch_stats},
        pipeline.normalize(s["batch"]["image"]), jax.random.fold_in(state.rng, state.step))
    expected = jax.tree_util.tree_leaves(updates["batch_stats"])
    got = jax.tree_util.tree_leaves(new_state.batch_stats)
    before = jax.tree_util.tree_leaves(state.batch_stats)
    assert len(expected) == len(got) == len(before) > 0
    for e, g, b in zip(expected, got, before):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(g), np.asarray(b))  # the running statistics moved


def test_config_fused_unroll_reaches_the_scan(tmp_path):
    """--config.fused_unroll decides whether the run's fused step is a loop or straight-line code
    (BENCHMARKS.md measured the rolled scan at 0.03x on a CPU, so 'auto' unrolls there)."""
    from train_runs import CONFIG, write_tiny_dataset

    ds = write_tiny_dataset(tmp_path)
    config = training.load_config(CONFIG, [f"--config.data.dataset={ds.parent}",
                                           f"--config.data.cache={tmp_path / 'cache'}", "--config.fused_steps=2",
                                           "--config.progress=False", "--config.tensorboard=False"])
    (tmp_path / "run").mkdir()
    trainer = training.Trainer(training.resolve_paths(config, tmp_path / "run"), tmp_path / "run")
    loops = {}
    try:
        single = trainer.lower(1).as_text().count("stablehlo.while")  # loops of the step itself
        for mode in ("rolled", "unrolled", "auto"):
            trainer.config.fused_unroll = mode
            loops[mode] = trainer.lower(2).as_text().count("stablehlo.while") - single
    finally:
        trainer.close()
    assert loops["rolled"] == 1 and loops["unrolled"] == 0  # the scan's own loop, or none
    assert loops["auto"] == (0 if jax.default_backend() == "cpu" else 1)


def test_one_executable_serves_every_fold_and_label_table(tmp_path):
    """The label table and class weights are arguments of the step: runs of another split, with
    Random G.T. labels and training-set class weights lower to the very same program, so the
    persistent compilation cache serves every run of a demo after the first."""
    from train_runs import CONFIG, write_tiny_dataset

    ds = write_tiny_dataset(tmp_path)
    common = [f"--config.data.dataset={ds.parent}", f"--config.data.cache={tmp_path / 'cache'}",
              "--config.progress=False", "--config.tensorboard=False"]
    texts, tables = [], []
    for name, extra in (("a", []), ("b", ["--config.split=2", "--config.random_gt=True",
                                          "--config.class_weights=train"])):
        workdir = tmp_path / name
        workdir.mkdir()
        config = training.resolve_paths(training.load_config(CONFIG, common + extra), workdir)
        trainer = training.Trainer(config, workdir)
        try:
            texts.append(trainer.lower(1).as_text())
            tables.append(jax.device_get(trainer.tables))
        finally:
            trainer.close()
    assert not np.array_equal(tables[0][0], tables[1][0])  # different labels reach the step...
    assert texts[0] == texts[1]  # ...through one program
