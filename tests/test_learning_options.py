"""The learning options (docs/EXPERIMENTS.md, "learning"): each does what its docstring says, the
official behaviour stays the default, against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from adaparse_jax import losses, models, spectral, targets, train_lib
from adaparse_jax.models import parsing

RNG = np.random.default_rng(0)


def test_official_defaults_are_unchanged():
    m = models.model_config("adaparse")
    assert (m.fen_input, m.parser_input_norm, m.parser_pool, m.parser_init) == (
        "image", "none", "flatten", "torch")
    lc = losses.default_loss_config()
    assert (lc.lowfreq_window, lc.constraint_scale, lc.constraint_ramp_steps) == ("clamped", 1.0, 0)
    opt = train_lib.default_config().optimizer
    assert (opt.clip_norm, opt.fen_lr_scale) == (0.0, 1.0)


@pytest.mark.parametrize("size, clamped, scaled", [(64, 25, 25), (32, 15, 12), (16, 7, 6)])
def test_scaled_window_keeps_the_official_ratio(size, clamped, scaled):
    assert spectral.clamped_half_size(size, size) == clamped
    assert spectral.scaled_half_size(size) == scaled


def test_scaled_window_reaches_the_spectrum_term():
    fp = jnp.asarray(RNG.normal(size=(1, 2, 32, 32, 3)), jnp.float32)
    cfg = losses.default_loss_config()
    cfg.lowfreq_window = "scaled"
    got = losses.fingerprint_constraints(fp, loss_config=cfg)["spectrum"]
    s = spectral.fingerprint_spectra(fp[0], lowfreq_half_size=12)
    assert s["lowfreq"].shape == (2, 25, 25)
    np.testing.assert_allclose(got, 0.05 * np.mean(np.square(s["lowfreq"])), rtol=1e-6)


def _outputs_and_labels(b=4):
    out = {"fingerprints": jnp.asarray(RNG.normal(size=(b, 1, 16, 16, 3)), jnp.float32),
           "continuous": jnp.full((b, 9), 0.5)}
    out["probs"] = {t.name: jnp.full((b, t.num_classes), 0.5) for t in targets.CLASSIFICATION_TARGETS}
    rows = jnp.zeros((b, targets.NUM_LABEL_COLUMNS), jnp.float32)
    labels = targets.split_labels(rows)
    weights = {t.name: jnp.ones(t.num_classes) for t in targets.CLASSIFICATION_TARGETS}
    return out, labels, weights


@pytest.mark.parametrize("step, factor", [(0, 0.0), (25, 0.25), (100, 1.0), (500, 1.0)])
def test_ramped_constraints_start_at_zero(step, factor):
    out, labels, weights = _outputs_and_labels()
    cfg = losses.default_loss_config()
    _, official = losses.total_loss(out, labels, weights, loss_config=cfg)
    cfg.constraint_ramp_steps = 100
    cfg.constraint_scale = 0.5
    _, ramped = losses.total_loss(out, labels, weights, loss_config=cfg, step=step)
    for k in losses.CONSTRAINT_TERMS:
        np.testing.assert_allclose(ramped[k], 0.5 * factor * official[k], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ramped["continuous"], official["continuous"], rtol=1e-6)


def test_highpass_is_the_image_minus_its_3x3_mean():
    x = RNG.normal(size=(2, 9, 11, 3)).astype(np.float32)
    want = x - ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode="nearest")
    np.testing.assert_allclose(parsing.highpass(jnp.asarray(x)), want, atol=1e-5)
    checker = np.indices((8, 8)).sum(0) % 2 * 2.0 - 1  # period-2 pattern: passes at 8/9
    hp = parsing.highpass(jnp.asarray(np.broadcast_to(checker[None, ..., None], (1, 8, 8, 1))))
    np.testing.assert_allclose(hp[0, 1:-1, 1:-1, 0], checker[1:-1, 1:-1] * 8 / 9, atol=1e-6)


def test_rms_normalize_makes_unit_rms_and_ignores_scale():
    x = jnp.asarray(RNG.normal(size=(3, 8, 8, 3)) * np.array([0.01, 1, 100])[:, None, None, None],
                    jnp.float32)
    y = parsing.rms_normalize(x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(y), axis=(1, 2, 3))), 1.0, rtol=1e-5)
    np.testing.assert_allclose(parsing.rms_normalize(7 * x), y, rtol=1e-5)


def test_global_pool_is_mean_std_max():
    x = RNG.normal(size=(2, 5, 5, 4)).astype(np.float32)
    want = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x.max((1, 2))], -1)
    np.testing.assert_allclose(parsing.global_pool(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def _init(**overrides):
    cfg = models.model_config("renet", "tiny")
    cfg.update(overrides)
    model = models.build_model(cfg)
    x = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
    return model, model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x), x


def test_parser_he_init_zero_biases_and_he_variance():
    _, v, _ = _init(parser_init="he", parser_conv_features=(64, 64, 8, 8, 8))
    p = v["params"]["parser"]
    assert all(np.all(p[f"conv{i}"]["bias"] == 0) for i in range(1, 6))
    k = np.asarray(p["conv2"]["kernel"])  # fan_in 9 * 64
    assert abs(k.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.05
    _, v0, _ = _init(parser_conv_features=(64, 64, 8, 8, 8))
    assert np.all(v0["params"]["parser"]["conv1"]["bias"] != 0)  # torch's default: U(+-1/sqrt(fan_in))


def test_global_pool_changes_fc1_input_and_fen_input_reaches_the_fen():
    _, flat, _ = _init()
    _, pooled, _ = _init(parser_pool="global")
    assert pooled["params"]["parser"]["fc1"]["kernel"].shape[0] == 3 * 16  # mean, std, max of 16
    assert flat["params"]["parser"]["fc1"]["kernel"].shape[0] != 3 * 16
    model, v, x = _init(fen_input="highpass")
    fen_of_highpass = model.fen.apply({"params": v["params"]["fen"], "batch_stats": v["batch_stats"]["fen"]},
                                      parsing.highpass(x))
    np.testing.assert_allclose(model.apply(v, x)["fingerprints"][:, 0], fen_of_highpass, atol=1e-5)
    # A constant image has no residual: with a high-pass input the fingerprint ignores the offset.
    np.testing.assert_allclose(model.apply(v, x + 3.0)["fingerprints"], model.apply(v, x)["fingerprints"],
                               atol=1e-4)


def test_rms_input_norm_makes_the_parser_ignore_the_fingerprint_scale():
    model, v, _ = _init(parser_input_norm="rms")
    fp = jnp.asarray(RNG.normal(size=(2, 1, 32, 32, 3)), jnp.float32)
    a = model.parser.apply({"params": v["params"]["parser"]}, fp)
    b = model.parser.apply({"params": v["params"]["parser"]}, 0.01 * fp)
    np.testing.assert_allclose(a["continuous"], b["continuous"], rtol=1e-4)


@pytest.mark.parametrize("arg, value", [("fen_input", "hp"), ("parser_pool", "avg"),
                                        ("parser_init", "xavier"), ("parser_input_norm", "l2")])
def test_bad_model_option_names_the_field(arg, value):
    cfg = models.model_config("renet", "tiny")
    cfg[arg] = value
    with pytest.raises(ValueError, match=arg):
        models.build_model(cfg)


def test_bad_loss_option_names_the_field():
    cfg = losses.default_loss_config()
    cfg.lowfreq_window = "wide"
    with pytest.raises(ValueError, match="lowfreq_window"):
        losses.constraint_factor(0, loss_config=cfg)


def _one_update(**opt_overrides):
    c = train_lib.default_config()
    c.optimizer.update(opt_overrides)
    tx = train_lib.make_optimizer(c)
    params = {"fen": {"w": jnp.ones(3)}, "parser": {"w": jnp.ones(3)}}
    grads = {"fen": {"w": jnp.full(3, 2.0)}, "parser": {"w": jnp.full(3, -2.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_fen_lr_scale_scales_only_the_fen_steps():
    base = _one_update(weight_decay=0.0)
    scaled = _one_update(weight_decay=0.0, fen_lr_scale=0.1)
    np.testing.assert_allclose(scaled["fen"]["w"], 0.1 * base["fen"]["w"], rtol=1e-6)
    np.testing.assert_allclose(scaled["parser"]["w"], base["parser"]["w"], rtol=1e-6)
    np.testing.assert_allclose(base["fen"]["w"], -1e-4, rtol=1e-3)  # Adam's first step: -lr * sign


def test_clip_norm_clips_the_global_gradient_norm_before_adam():
    def updates(tx, grads_seq):
        params = {"fen": {"w": jnp.ones(3)}, "parser": {"w": jnp.ones(3)}}
        state, out = tx.init(params), []
        for g in grads_seq:
            u, state = tx.update(g, state, params)
            out.append(u)
        return out

    # Two steps whose gradients differ in norm: Adam's second step depends on the ratio, which
    # clipping changes (both are clipped to norm 1).
    seq = [{"fen": {"w": jnp.full(3, s)}, "parser": {"w": jnp.full(3, -s)}} for s in (1.0, 10.0)]
    c = train_lib.default_config()
    c.optimizer.update(weight_decay=0.0, clip_norm=1.0)
    got = updates(train_lib.make_optimizer(c), seq)
    ref = updates(optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                              optax.scale(-1e-4)), seq)
    c.optimizer.clip_norm = 0.0
    unclipped = updates(train_lib.make_optimizer(c), seq)
    np.testing.assert_allclose(got[1]["fen"]["w"], ref[1]["fen"]["w"], rtol=1e-5)
    assert not np.allclose(unclipped[1]["fen"]["w"], ref[1]["fen"]["w"], rtol=1e-3)
