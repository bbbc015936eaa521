"""The PyTorch twin (benchmarks/torch_twin.py) computes what the JAX models compute.

Same converted weights, same uint8 batch, tiny size: eval- and train-mode outputs, every loss term,
every gradient, and the parameters and BatchNorm statistics after one Adam step agree within float32
tolerance. Skips without torch (the optional `torch` extra).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adaparse_jax import convert, losses, models, targets  # noqa: E402
from adaparse_jax import train as training  # noqa: E402
from adaparse_jax.data import pipeline, synthetic  # noqa: E402
from benchmarks import torch_twin  # noqa: E402

pytestmark = pytest.mark.xdist_group("torch_twin")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def setup(arch: str):
    cfg = models.model_config(arch, "tiny")
    cfg.dropout = 0.0  # the two frameworks draw different dropout masks
    model = models.build_model(cfg)
    # Weights drawn with NumPy (like shared/reference's parity rule; no init compile), running
    # statistics away from (0, 1) so that eval mode tests them.
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, x.shape)
        if name == "scale":
            return rng.uniform(0.8, 1.2, x.shape)
        if name in ("bias", "mean"):
            return 0.05 * rng.standard_normal(x.shape)
        fan_in = np.prod(x.shape[:-1]) if len(x.shape) > 1 else x.shape[-1]
        return rng.standard_normal(x.shape) * np.sqrt(2 / fan_in)

    shapes = models.variable_shapes(cfg)
    variables = jax.tree_util.tree_map_with_path(lambda p, x: np.asarray(draw(p, x), np.float32),
                                                 {k: shapes[k] for k in ("params", "batch_stats")})
    s = cfg.image_size
    twin = torch_twin.build(cfg)
    torch_twin.load_variables(twin, cfg, variables)
    images = rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8)
    return cfg, model, variables, twin, images


def official_names(cfg, variables) -> dict:
    """JAX variables as a state dict with the official names and torch layouts."""
    out = {}
    for plan in torch_twin.plans(cfg).values():
        out.update(convert.to_torch(variables, plan))
    return out


def nhwc(fingerprints) -> np.ndarray:
    return fingerprints.detach().permute(0, 1, 3, 4, 2).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("arch", models.ARCHS)
def test_twin_computes_what_the_jax_model_computes(arch):
    """Eval outputs, train-mode outputs, loss terms, gradients, one Adam step (one compile)."""
    cfg, model, variables, twin, images = setup(arch)
    config = training.default_config()
    config.model = cfg
    config.optimizer.learning_rate = 1e-3
    table = targets.label_matrix(synthetic.label_tables(24, seed=0))
    weights = targets.class_weights(table)
    generators = np.array([0, 5, 11, 17], np.int32)

    # JAX: loss terms, gradients and BatchNorm updates of the training loss, then the optimiser
    # of `training.make_optimizer` (what `make_train_step` composes).
    x = pipeline.normalize(jnp.asarray(images))
    labels = targets.split_labels(jnp.asarray(table)[generators])

    def loss(params):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                   train=True, mutable=["batch_stats"])
        total, terms = losses.total_loss(out, labels, weights, loss_config=config.loss)
        return total, (out, terms, updates)

    def compute(params):
        evaluated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=False)
        return evaluated, jax.value_and_grad(loss, has_aux=True)(params)

    ours_eval, ((_, (ours_train, terms_jax, updates)), grads) = jax.jit(compute)(variables["params"])

    # Outputs: eval mode (running statistics), then train mode (batch statistics).
    theirs_eval = torch_twin.infer(twin, torch_twin.to_nchw(images))
    twin.train()
    with torch.no_grad():
        theirs_train = twin(torch_twin.to_nchw(images))
    for ours, theirs in ((ours_eval, theirs_eval), (ours_train, theirs_train)):
        assert np.std(np.asarray(ours["fingerprints"])) > 0.1  # a live network, not a constant
        assert rel(nhwc(theirs["fingerprints"]), ours["fingerprints"]) < 1e-4
        assert rel(theirs["continuous"], ours["continuous"]) < 1e-4
        assert set(theirs["probs"]) == set(ours["probs"])
        for name in ours["probs"]:
            assert rel(theirs["probs"][name], ours["probs"][name]) < 1e-4, name
    torch_twin.load_variables(twin, cfg, variables)  # undo the running statistics' update
    tx = training.make_optimizer(config)
    step, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    new_params = jax.tree.map(lambda p, u: p + u, variables["params"], step)

    # The twin: one step of torch Adam.
    twin_step = torch_twin.TrainStep(twin, config.optimizer, config.loss, table, weights)
    terms = twin_step(torch_twin.to_nchw(images), torch.from_numpy(generators).long())

    assert set(terms) == set(terms_jax)
    for k, v in terms.items():
        ours = float(terms_jax[k])
        assert abs(float(v) - ours) <= 1e-4 * max(abs(ours), 1e-2), k
    expected_grads = official_names(cfg, {"params": grads, "batch_stats": variables["batch_stats"]})
    got_grads = torch_twin.state_dicts(twin, cfg, grads=True)
    assert set(got_grads) == {k for k in expected_grads if "running" not in k}
    # Relative agreement, except for gradients that are zero in exact arithmetic and float32
    # round-off here (z_b and the biases of layers followed by a BatchNorm, which removes any
    # shift shared by the rows): those must be round-off in both.
    rms = np.sqrt(sum(np.sum(e ** 2) for e in expected_grads.values()) /
                  sum(e.size for e in expected_grads.values()))
    for k, g in got_grads.items():
        e = expected_grads[k]
        if np.sqrt(np.mean(e ** 2)) < 1e-3 * rms:
            assert np.sqrt(np.mean(g ** 2)) < 1e-3 * rms, k
        else:
            assert rel(g, e) < 1e-3, k
    # After the step: the running statistics moved alike, and so did every parameter whose
    # gradient (with weight decay) is clear of round-off; Adam's first step is about
    # -lr * sign(gradient) there.
    expected = official_names(cfg, {"params": new_params, "batch_stats": updates["batch_stats"]})
    before = official_names(cfg, variables)
    got = torch_twin.state_dicts(twin, cfg)
    wd = config.optimizer.weight_decay
    clear = 0
    for k, v in expected.items():
        if "running" in k:
            assert rel(got[k], v) < 1e-4, k
            continue
        mask = np.abs(expected_grads[k] + wd * before[k]) > 1e-4
        clear += mask.sum()
        assert np.abs(got[k] - v)[mask].max(initial=0) < 2e-5, k
        assert np.abs(v - before[k])[mask].min(initial=1) > 5e-4, k  # ~lr: the step did move it
    assert clear > 0.5 * sum(v.size for k, v in expected.items() if "running" not in k)
