"""The benchmark's own measuring tools: FLOP counting, the 25-branch lever's variants, precision,
commit stamps and timing.

The FLOP counter is checked on hand-computed products and convolutions and then against DESIGN.md's
counts for the full-size models (traced only, nothing allocated). The branch variants of the lever
must compute the model's function in eval mode, or the lever would compare different work.
"""

from __future__ import annotations

import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaparse_jax import losses, models, targets
from benchmarks import common, levers


def test_conv_dot_flops_on_hand_counted_ops():
    a = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)
    b = jax.ShapeDtypeStruct((3, 7, 11), jnp.float32)
    assert common.conv_dot_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 11

    x = jax.ShapeDtypeStruct((2, 10, 12, 4), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)  # HWIO

    def conv(x, w, padding):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # 'SAME': 10 x 12 outputs; 'VALID': 8 x 10; each output 3 * 3 * 4 multiply-adds.
    assert common.conv_dot_flops(lambda x, w: conv(x, w, "SAME"), x, w) == 2 * (2 * 10 * 12 * 6) * 36
    assert common.conv_dot_flops(lambda x, w: conv(x, w, "VALID"), x, w) == 2 * (2 * 8 * 10 * 6) * 36

    # A scan runs its body `length` times; jit and grad are looked through.
    def scanned(c, ws):
        return jax.lax.scan(lambda c, w: (c @ w, None), c, ws)[0]

    c, ws = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((5, 8, 8), jnp.float32)
    assert common.conv_dot_flops(jax.jit(scanned), c, ws) == 5 * 2 * 4 * 8 * 8
    # Gradient of sum(x @ w) w.r.t. both: forward + two products of the same size.
    m, n = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 3), jnp.float32)
    grad = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
    assert common.conv_dot_flops(grad, m, n) == 3 * (2 * 4 * 8 * 3)


@pytest.mark.parametrize("arch, design", [("adaparse", 52.0), ("renet", 4.86)])
def test_counted_forward_flops_match_design_counts(arch, design):
    """DESIGN.md's forward GFLOP per 64x64 image, counted from the official models."""
    cfg = models.model_config(arch)
    model = models.build_model(cfg)
    shapes = models.variable_shapes(cfg)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    counted = common.conv_dot_flops(lambda v, x: model.apply(v, x, train=False), shapes, x) / 2 / 1e9
    assert counted == pytest.approx(design, rel=2e-3)


@pytest.fixture(scope="module")
def branches():
    cfg = models.model_config("adaparse", "tiny")
    net = levers.adaptive_blocks(cfg)
    streams = jax.random.normal(jax.random.key(0), (2, targets.NUM_HEADS, 8, 8, cfg.width))
    variables = net.init(jax.random.key(1), streams[:, 0], train=False)
    # Non-trivial running statistics, so eval mode really normalises.
    stats = jax.tree.map(lambda v: v + 0.3 * jnp.arange(v.shape[-1]) / v.shape[-1], variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    return cfg, variables, streams


def test_branch_variants_compute_the_models_function_in_eval_mode(branches):
    cfg, variables, streams = branches
    out = {m: np.asarray(levers.branch_forward(cfg, m, train=False)(variables, streams))
           for m in levers.BRANCH_MODES}
    assert out["folded"].shape == (2, targets.NUM_HEADS, 8, 8, 3)
    np.testing.assert_allclose(out["vmap"], out["folded"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["loop"], out["folded"], rtol=1e-5, atol=1e-5)


def test_branch_variants_in_training_differ_only_by_batchnorm_statistics(branches):
    """Folded: statistics over all 25 * B streams (the model); vmap and loop: per target."""
    cfg, variables, streams = branches
    out = {m: np.asarray(levers.branch_forward(cfg, m, train=True)(variables, streams))
           for m in levers.BRANCH_MODES}
    np.testing.assert_allclose(out["vmap"], out["loop"], rtol=1e-5, atol=1e-5)
    assert np.abs(out["folded"] - out["loop"]).max() > 1e-3
    # Per-target statistics are the folded computation applied to one target's streams at a time.
    one = levers.branch_forward(cfg, "folded", train=True)(variables, streams[:, 3:4])
    np.testing.assert_allclose(out["loop"][:, 3:4], np.asarray(one), rtol=1e-5, atol=1e-5)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in common._sub_jaxprs(v):  # noqa: SLF001
                yield from _eqns(sub)


def test_bf16_compute_keeps_float32_params_and_a_float32_spectrum():
    """The precision lever: bf16 convolutions, float32 parameters, FFTs on complex64."""
    cfg = models.model_config("renet", "tiny")
    cfg.dtype = "bfloat16"
    model = models.build_model(cfg)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = models.variable_shapes(cfg, batch_size=2)  # traced only: nothing is computed
    assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    labels = targets.split_labels(jnp.zeros((2, targets.NUM_LABEL_COLUMNS)))
    weights = {t.name: jnp.ones(t.num_classes) for t in targets.CLASSIFICATION_TARGETS}

    def loss(v, x):
        out, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
        return losses.total_loss(out, labels, weights, loss_config=losses.default_loss_config())[0]

    eqns = list(_eqns(jax.make_jaxpr(jax.grad(loss))(variables, x).jaxpr))
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    ffts = [e for e in eqns if e.primitive.name == "fft"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
    assert ffts and all(e.invars[0].aval.dtype == jnp.complex64 for e in ffts)


def test_commit_stamp_marks_a_dirty_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    clean = common.git_commit(tmp_path)
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (tmp_path / "untracked.txt").write_text("new")  # untracked files do not make it dirty
    assert common.git_commit(tmp_path) == clean
    (tmp_path / "f.txt").write_text("b")
    assert common.git_commit(tmp_path) == clean + "-dirty"


def test_time_calls_takes_the_median_per_call_over_repeats():
    durations = iter([0.0] + [0.001, 0.001, 0.05, 0.001, 0.001, 0.001] * 10)
    calls = []

    def call():
        time.sleep(next(durations))
        calls.append(1)
        return jnp.zeros(())

    timing = common.time_calls(call, repeats=3, warmup=1, min_repeat_s=0.0)
    assert timing["calls"] == 1 and len(timing["repeats"]) == 3 and len(calls) == 4
    # One slow repeat (50 ms) among fast ones: the median ignores it.
    assert timing["seconds"] < 0.03


@pytest.mark.slow
def test_parser_trunk_is_the_models_and_explicit_padding_the_same_function():
    """The parser-padding lever times the ParsingNetwork's own conv stages, and its variant is exact."""
    cfg = models.model_config("adaparse", "tiny")
    parser = models.ParsingNetwork(tuple(cfg.parser_conv_features), tuple(cfg.parser_fc_features))
    fp = jax.random.normal(jax.random.key(0), (2, 1, 32, 32, 3))
    # Random values in the parameters' shapes (initialising the 28 heads compiles slowly on a CPU).
    shapes = jax.eval_shape(lambda k: parser.init(k, fp, train=False), jax.random.key(1))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    _, model_inter = jax.jit(lambda p: parser.apply({"params": p}, fp, train=False,
                                                    capture_intermediates=True))(params)
    last = f"conv{len(cfg.parser_conv_features)}"
    trunk_params = {k: v for k, v in params.items() if k.startswith("conv")}
    trunk = levers.ParserTrunk(tuple(cfg.parser_conv_features))
    _, trunk_inter = jax.jit(lambda p: trunk.apply({"params": p}, fp[:, 0],
                                                   capture_intermediates=True))(trunk_params)
    np.testing.assert_allclose(trunk_inter["intermediates"][last]["__call__"][0],
                               model_inter["intermediates"][last]["__call__"][0], rtol=1e-6, atol=1e-6)

    (loss_a, grads_a) = levers.padding_step(cfg, explicit_pad=False)(trunk_params, fp[:, 0])
    (loss_b, grads_b) = levers.padding_step(cfg, explicit_pad=True)(trunk_params, fp[:, 0])
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
