"""models.conv_ops: the weight gradient as per-kernel-row matrix products is XLA's convolution gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaparse_jax import models
from adaparse_jax.models import conv_ops


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 0), (0, 0)), ((2, 1), (0, 2))])
def test_weight_dots_gradients_equal_xla_convolution_gradients(padding):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 10, 9, 16))
    w = jax.random.normal(kw, (3, 3, 16, 24)) / 12

    def loss(conv):
        def f(x, w):
            y = conv(x, w)
            return jnp.sum(y * jax.random.normal(kd, y.shape))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = loss(xla), loss(
        lambda x, w: conv_ops.conv_weight_dots(x, w, padding))
    assert abs(float(v1) - float(v0)) <= 1e-5 * abs(float(v0))
    assert rel(dx1, dx0) < 1e-6  # the same XLA transposed convolution
    assert rel(dw1, dw0) < 1e-5


def _grad_jaxpr(impl: str, channels: int, batch: int = 1) -> str:
    conv = conv_ops.conv_function(impl)
    x, w = jnp.ones((batch, 6, 6, channels)), jnp.ones((3, 3, channels, channels))
    return str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv(
        x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")))))(w))


def test_conv_function_dispatch():
    assert "dot_general" in _grad_jaxpr("weight_dots", 16)
    assert "dot_general" not in _grad_jaxpr("xla", 16)
    # A 3-wide side (DnCNN stem / final convolution) keeps XLA's weight gradient.
    assert "dot_general" not in _grad_jaxpr("weight_dots", conv_ops.MIN_DOT_CHANNELS - 1)
    # auto: the products on a CPU backend (this test process) from MIN_DOT_BATCH images on (the
    # folded streams), XLA's convolution for smaller batches and on other backends.
    on_cpu = jax.default_backend() == "cpu"
    assert ("dot_general" in _grad_jaxpr("auto", 16, conv_ops.MIN_DOT_BATCH)) == on_cpu
    assert "dot_general" not in _grad_jaxpr("auto", 16, conv_ops.MIN_DOT_BATCH - 1)
    assert "dot_general" not in _grad_jaxpr("auto", conv_ops.MIN_DOT_CHANNELS - 1, 64)
    with pytest.raises(ValueError, match="conv_impl='fast'"):
        conv_ops.conv_function("fast")


def test_model_config_rejects_an_unknown_conv_impl():
    cfg = models.model_config("renet", "tiny")
    cfg.conv_impl = "winograd"
    with pytest.raises(ValueError, match="conv_impl='winograd'"):
        models.build_model(cfg)


def _fen(arch: str, impl: str):
    cfg = models.model_config(arch, "tiny")
    cfg.width, cfg.conv_impl = 16, impl  # width 16: the DnCNN blocks take the products
    x = jax.random.normal(jax.random.key(1), (2, cfg.image_size, cfg.image_size, 3))
    return cfg, models.build_model(cfg).fen, x


def test_conv_impl_reaches_every_dncnn_block_of_adaparse():
    """3 products (one per kernel row) per DnCNN block in the gradient (the stem and final conv
    keep XLA's); 'auto' on a CPU only in the blocks that run on the 25 folded streams of the 2
    images (50 >= MIN_DOT_BATCH), not in the shared and middle blocks (batch 2)."""
    counts = {}
    for impl in ("xla", "weight_dots", "auto"):
        cfg, fen, x = _fen("adaparse", impl)
        variables = jax.eval_shape(lambda x, fen=fen: fen.init(jax.random.key(0), x), x)

        def loss(params, stats, fen=fen, x=x):
            out, _ = fen.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
            return jnp.sum(out)

        jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"])
        counts[impl] = str(jaxpr).count("dot_general")
    assert counts["weight_dots"] - counts["xla"] == 3 * (cfg.depth - 2)
    folded_blocks = cfg.depth - 2 - cfg.inject_block
    assert folded_blocks > 0 and cfg.inject_block > 0
    assert counts["auto"] - counts["xla"] == (3 * folded_blocks if jax.default_backend() == "cpu" else 0)


def test_conv_impl_is_the_same_function_in_the_models():
    """RE-Net's FEN: fingerprints, BatchNorm updates and gradients with each conv_impl."""
    arch = "renet"
    results = {}
    for impl in ("xla", "weight_dots"):
        cfg, fen, x = _fen(arch, impl)
        variables = jax.jit(lambda x, fen=fen: fen.init(jax.random.key(0), x, train=False))(x)

        def loss(params, fen=fen, variables=variables, x=x):
            out, updates = fen.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
            return jnp.sum(jnp.sin(out)), (out, updates)

        results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    (_, (out0, up0)), g0 = results["xla"]
    (_, (out1, up1)), g1 = results["weight_dots"]
    assert rel(out1, out0) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), up1, up0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        # Conv biases before a BatchNorm have zero gradient up to round-off in both.
        assert rel(b, a) < 1e-4 or (np.abs(a).max() < 1e-4 and np.abs(b).max() < 1e-4), \
            jax.tree_util.keystr(path)


def test_conv_impl_reaches_the_parser_and_keeps_its_function():
    """The parser's conv stages take the products where they have >= 16 channels on both sides,
    with the same outputs and gradients as XLA's convolutions."""
    x = jax.random.normal(jax.random.key(2), (2, 1, 16, 16, 3))
    grads, counts = {}, {}
    for impl in ("xla", "weight_dots"):
        cfg = models.model_config("renet", "tiny")
        cfg.conv_impl, cfg.parser_conv_features, cfg.parser_fc_features = impl, (8, 16, 32), (16,)
        parser = models.build_model(cfg).parser
        variables = parser.init(jax.random.key(0), x)

        def loss(params, parser=parser):
            out = parser.apply({"params": params}, x)
            return jnp.sum(jnp.sin(out["continuous"])) + sum(jnp.sum(v) for v in out["logits"].values())

        counts[impl] = str(jax.make_jaxpr(jax.grad(loss))(variables["params"])).count("dot_general")
        grads[impl] = jax.jit(jax.grad(loss))(variables["params"])
    assert counts["weight_dots"] - counts["xla"] == 3  # conv3 (16 -> 32) only: conv1, conv2 have < 16
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["xla"]),
                            jax.tree.leaves(grads["weight_dots"])):
        assert rel(b, a) < 1e-4, jax.tree_util.keystr(path)
