"""adaparse_jax.diagnose: gradient norms per term and group, Adam's step ratio, unit activity, probe
(the command line on trained runs: test_diagnose_cli.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adaparse_jax import diagnose, losses, models, targets
from adaparse_jax import train as training
from adaparse_jax.data import pipeline, synthetic

SIZE = 16


def _model_config(arch: str) -> ml_collections.ConfigDict:
    cfg = models.model_config(arch, size="tiny")
    cfg.image_size = SIZE
    cfg.dropout = 0.0  # no dropout key enters the reference gradients
    return cfg


@pytest.fixture(scope="module")
def tiny_adaparse():
    """A tiny AdaParse at 16 px, two batches of 4 random images of 6 generators, and its labels."""
    model = models.build_model(_model_config("adaparse"))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                           jnp.zeros((2, SIZE, SIZE, 3)), train=False)
    table = targets.label_matrix(synthetic.label_tables(6, seed=1))
    weights = targets.class_weights(table)
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)),
                "generator": jnp.asarray(rng.integers(0, 6, 4).astype(np.int32))} for _ in range(2)]
    loss_fn = functools.partial(training.training_loss, model, label_table=jnp.asarray(table),
                                class_weights=weights, loss_config=losses.default_loss_config())
    result = diagnose.term_gradients(loss_fn, variables["params"], variables["batch_stats"], batches,
                                     step=0)
    return dict(model=model, variables=variables, table=table, weights=weights, batches=batches,
                result=result)


REFERENCE_TERMS = ("spectrum", "upsampling", "continuous")


@pytest.fixture(scope="module")
def reference_grads(tiny_adaparse):
    """jax.grad of each of REFERENCE_TERMS alone, written from the model and losses directly: the
    mean over the batches of `total_loss(...)[1][term]` with BatchNorm in training mode. One
    compilation for the three terms."""
    setup = tiny_adaparse
    model, variables = setup["model"], setup["variables"]

    def loss(params, term):
        values = []
        for batch in setup["batches"]:
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 pipeline.normalize(batch["image"]), train=True,
                                 mutable=["batch_stats"])
            labels = targets.split_labels(jnp.asarray(setup["table"])[batch["generator"]])
            values.append(losses.total_loss(out, labels, setup["weights"])[1][term])
        return sum(values) / len(values), values

    grads = jax.jit(lambda p: {t: jax.grad(loss, has_aux=True)(p, t) for t in REFERENCE_TERMS})
    return grads(variables["params"])


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("term", REFERENCE_TERMS)
def test_term_gradient_norms_equal_the_gradient_of_that_term_alone(tiny_adaparse, reference_grads, term):
    g, values = reference_grads[term]
    fen = g["fen"]
    expected = {"fen/shared": _norm(fen["shared"]), "fen/hypernet": _norm(fen["hypernet"]),
                "fen/middle+adaptive": _norm([fen["middle"], fen["adaptive"]]),
                "parser": _norm(g["parser"]), diagnose.ALL: _norm(g)}
    got = tiny_adaparse["result"]["norms"][term]
    assert set(got) == set(expected)
    for group, norm in expected.items():
        np.testing.assert_allclose(got[group], norm, rtol=2e-4, atol=1e-12, err_msg=group)
    assert expected[diagnose.ALL] > 0
    np.testing.assert_allclose(tiny_adaparse["result"]["values"][term],
                               float(np.mean([float(v) for v in values])), rtol=1e-5)
    if term in losses.CONSTRAINT_TERMS:  # the constraints never reach the parser
        assert got["parser"] == 0.0


def test_group_norms_sum_in_quadrature_to_the_total_norm(tiny_adaparse):
    norms = tiny_adaparse["result"]["norms"]
    groups = ["fen/shared", "fen/hypernet", "fen/middle+adaptive", "parser"]
    assert set(norms) == set(
        [*losses.CONSTRAINT_TERMS, "continuous", *(t.name for t in targets.CLASSIFICATION_TARGETS),
         diagnose.CONSTRAINTS, diagnose.CROSS_ENTROPIES, diagnose.TOTAL])
    for row, n in norms.items():
        assert sorted(n) == sorted([*groups, diagnose.ALL])
        np.testing.assert_allclose(np.sqrt(sum(n[g] ** 2 for g in groups)), n[diagnose.ALL],
                                   rtol=1e-5, err_msg=row)
    # The family rows are the sums' gradients: the cross-entropies' gradient is not the sum of norms.
    ce = [t.name for t in targets.CLASSIFICATION_TARGETS]
    assert norms[diagnose.CROSS_ENTROPIES][diagnose.ALL] <= sum(norms[c][diagnose.ALL] for c in ce)
    assert norms[diagnose.CONSTRAINTS]["parser"] == 0.0


def test_parameter_groups_come_from_the_tree():
    for arch, expected in (("adaparse", ["fen/shared", "fen/hypernet", "fen/middle+adaptive", "parser"]),
                           ("renet", ["fen", "parser"])):
        params = models.variable_shapes(_model_config(arch))["params"]
        assert diagnose.group_names(params) == expected


def test_adam_ratio_equals_a_hand_computation_after_two_optax_steps():
    b2, eps = 0.99, 1e-3
    config = training.default_config()
    config.optimizer.update(dict(learning_rate=0.1, weight_decay=0.0, b2=b2, eps=eps,
                                 fen_lr_scale=0.5))  # a masked scale after Adam: still found
    tx = training.make_optimizer(config)
    rng = np.random.default_rng(3)

    def tree(scale=1.0):
        return {"fen": {"shared": {"w": scale * rng.normal(size=(5, 3)).astype(np.float32)},
                        "adaptive": {"final": {"b": scale * rng.normal(size=(7,)).astype(np.float32)}}},
                "parser": {"fc1": {"kernel": scale * rng.normal(size=(4, 4)).astype(np.float32)}}}

    params = jax.tree.map(jnp.asarray, tree())
    g1, g2, g_now = tree(), tree(0.1), tree(2.0)
    state = tx.init(params)
    for g in (g1, g2):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    got = diagnose.adam_step_ratio(jax.tree.map(np.square, g_now), state, b2=b2, eps=eps)
    assert got["count"] == 2

    def ratio(a, b, c):  # v_2 = (1 - b2) (b2 g1^2 + g2^2), bias-corrected by 1 - b2^2
        v_hat = (1 - b2) * (b2 * np.square(a) + np.square(b)) / (1 - b2 ** 2)
        return np.abs(c) / (np.sqrt(v_hat) + eps)

    r = jax.tree.map(ratio, g1, g2, g_now)
    expected = {"fen/shared": r["fen"]["shared"]["w"].ravel(),
                "fen/middle+adaptive": r["fen"]["adaptive"]["final"]["b"].ravel(),
                "parser": r["parser"]["fc1"]["kernel"].ravel()}
    assert set(got["groups"]) == set(expected)
    for group, values in expected.items():
        q10, med, q90 = np.quantile(values, [0.1, 0.5, 0.9])
        row = got["groups"][group]
        np.testing.assert_allclose([row["q10"], row["median"], row["q90"]], [q10, med, q90], rtol=1e-5)
        assert row["parameters"] == values.size


class _ToyParser(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4, name="fc1")(x[:, :1]))


class _ToyModel(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        del train
        _ToyParser(name="parser")(x.reshape(x.shape[0], -1))
        return {"fingerprints": x[:, None]}


def test_dead_and_always_on_units_and_spread_on_a_hand_built_layer():
    # Unit 0: weight 0, bias -1 (never active); unit 1: weight 0, bias +1 (always active, constant);
    # units 2 and 3: +-(normalised pixel 0), active on the images brighter / darker than the mean.
    kernel = np.array([[0.0, 0.0, 1.0, -1.0]], np.float32)
    bias = np.array([-1.0, 1.0, 0.0, 0.0], np.float32)
    params = {"parser": {"fc1": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}
    pixel = np.array([0, 255, 40, 250, 30, 220, 10, 200], np.uint8)  # both signs in each batch
    images = np.zeros((8, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = pixel
    batches = [{"image": jnp.asarray(images[i:i + 4]), "generator": jnp.zeros(4, jnp.int32)}
               for i in (0, 4)]
    out = diagnose.activation_pass(_ToyModel(), params, {}, batches)
    layer = out["layers"]["parser/fc1"]
    assert layer["kind"] == "relu" and layer["units"] == 4
    assert layer["dead"] == 0.25 and layer["always_on"] == 0.25
    x = (pixel / 255.0 - pipeline.MEAN) / pipeline.STD
    a = np.maximum(x[:, None] * kernel + bias, 0)  # [8 images, 4 units], post-ReLU
    np.testing.assert_allclose(layer["std"], np.sqrt(a.var(0).mean()), rtol=1e-5)
    np.testing.assert_allclose(layer["spread"], np.sqrt(a.var(0).mean() / np.square(a.mean(0)).mean()),
                               rtol=1e-5)
    assert out["fingerprints"].shape == (8, 1, 4, 4, 3)


def test_relu_layer_table_matches_the_models():
    """Every ReLU layer of both models is captured once: the DnCNN stem and blocks, the
    hypernetwork's BatchNorms before ReLUs, the parser's convolutions and FC layers (+ 28 heads)."""
    for arch in models.ARCHS:
        cfg = _model_config(arch)
        model = models.build_model(cfg)
        x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
        variables = models.variable_shapes(cfg)
        _, state = jax.eval_shape(functools.partial(
            model.apply, train=True, capture_intermediates=diagnose.activations._capture,
            mutable=["batch_stats", "intermediates"], rngs={"dropout": jax.random.key(0)}), variables, x)
        flat = diagnose.subject.flat(state["intermediates"])
        # The parser's sown features sit beside the captured layer outputs ('__call__').
        assert {p for p in flat if not p.endswith("/__call__")} == {"parser/features"}
        paths = [p.removesuffix("/__call__") for p in flat if p.endswith("/__call__")]
        relu = [p for p in paths if diagnose.RELU_LAYERS.search(p)]
        heads = [p for p in paths if diagnose.HEAD_LAYERS.match(p)]
        expected = (cfg.depth - 1 + len(cfg.parser_conv_features) + len(cfg.parser_fc_features))
        if arch == "adaparse":
            expected += len(cfg.extractor_features) + len(cfg.fc_features) + 1
        assert len(relu) == len(set(relu)) == expected, relu
        assert len(heads) == targets.NUM_HEADS + len(targets.GROUPS)
        assert len(paths) == len(relu) + len(heads)


def test_probe_reads_an_attribute_from_its_own_fingerprint_only():
    rng = np.random.default_rng(0)
    gens = np.repeat(np.arange(12), 4)
    rows = np.zeros((12, targets.NUM_LABEL_COLUMNS), np.float32)
    up = targets.column_index("upsampling")
    rows[:, up] = np.arange(12) % 2
    rows[:, targets.column_index("skip")] = (np.arange(12) // 2) % 2
    label_rows = rows[gens]
    n = len(gens)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    fps = rng.normal(size=(n, len(targets.DISCRETE_TARGETS), SIZE, SIZE, 3)).astype(np.float32)
    checker = (np.indices((SIZE, SIZE)).sum(0) % 2)[..., None] * 3.0
    i_up = [t.name for t in targets.DISCRETE_TARGETS].index("upsampling")
    fps[:, i_up] += label_rows[:, up, None, None, None] * checker  # only upsampling's fingerprint
    out = diagnose.fingerprint_probe(images, fps, gens, label_rows, seed=0)
    assert list(out) == [t.name for t in targets.DISCRETE_TARGETS]
    assert out["upsampling"]["fingerprint"] == 1.0
    assert out["upsampling"]["image"] < 0.8  # random images carry nothing
    assert out["skip"]["fingerprint"] < 0.8  # the checkerboard is not in skip's fingerprint
    assert out["normalization"]["image"] is None  # one class in the sample: not available
    assert out["upsampling"]["generators"] == 12
