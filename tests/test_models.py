"""Models: shapes, full-size parameter counts, batched weight generation, personalisation,
ablation overrides, BatchNorm semantics and bf16 compute.

Most tests fill the tiny models' variables with NumPy (shapes from `jax.eval_shape`), which is
much faster on a CPU than compiling flax's random initialisers; one test runs the real init.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaparse_jax import models, targets

B = 2


def numpy_variables(cfg, seed=0):
    """Variables of the right shapes: He-scaled kernels, small biases, BN scales near 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            x = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[:-1]))
        elif name in ("z_b", "z_hp"):
            x = rng.uniform(-1, 1, shape) * math.sqrt(6 / sum(shape))
        elif name == "scale":
            x = rng.uniform(0.8, 1.2, shape)
        elif name == "var":
            x = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            x = 0.05 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, models.variable_shapes(cfg))


def tiny(arch="adaparse", **overrides):
    cfg = models.model_config(arch, size="tiny")
    cfg.update(overrides)
    return cfg


def images(cfg, seed=0, batch=B):
    return jax.random.normal(jax.random.key(seed), (batch, cfg.image_size, cfg.image_size, 3))


def apply(cfg, variables, x, train=False):
    model = models.build_model(cfg)
    fn = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"]))
    return fn(variables, x)


@pytest.fixture(scope="module")
def adaparse_run():
    """Tiny AdaParse: config, variables, images and eval-mode outputs (shared by several tests)."""
    cfg = tiny()
    variables = numpy_variables(cfg)
    x = images(cfg)
    out, _ = apply(cfg, variables, x)
    return cfg, variables, x, out


def test_output_shapes_and_gating(adaparse_run):
    cfg, _, _, out = adaparse_run
    s = cfg.image_size
    assert out["fingerprints"].shape == (B, targets.NUM_HEADS, s, s, 3)
    assert out["continuous"].shape == (B, len(targets.CONTINUOUS_TARGETS))
    names = {t.name for t in targets.CLASSIFICATION_TARGETS}
    assert set(out["logits"]) == set(out["probs"]) == names
    for t in targets.CLASSIFICATION_TARGETS:
        assert out["logits"][t.name].shape == (B, t.num_classes)
        expected = jax.nn.sigmoid(out["logits"][t.name])
        if t.kind == targets.FLAG:  # official gating: times the group's P(used)
            expected = expected * jax.nn.sigmoid(out["logits"][t.group])[:, 1:2]
        np.testing.assert_allclose(out["probs"][t.name], expected, rtol=1e-6, err_msg=t.name)
    assert np.all((out["continuous"] >= 0) & (out["continuous"] <= 1))


def test_renet_output_shapes():
    cfg = tiny("renet")
    out, _ = apply(cfg, numpy_variables(cfg), images(cfg))
    assert out["fingerprints"].shape == (B, 1, cfg.image_size, cfg.image_size, 3)
    assert out["continuous"].shape == (B, 9)
    assert out["probs"]["ce"].shape == (B, 2) and out["probs"]["normalization"].shape == (B, 4)


def test_head_features_routing():
    feats = jnp.arange(B * targets.NUM_HEADS * 3, dtype=jnp.float32).reshape(B, targets.NUM_HEADS, 3)
    l2 = targets.BY_NAME["l2"]
    np.testing.assert_array_equal(models.head_features(feats, l2), feats[:, targets.head_index("l2")])
    group = targets.BY_NAME["loss_group2"]
    idx = [targets.head_index(m) for m in group.members]
    np.testing.assert_allclose(models.head_features(feats, group), feats[:, idx].mean(1))
    one = feats[:, :1]  # RE-Net: every head, groups included, reads the one fingerprint
    for t in (l2, group, targets.BY_NAME["layers"]):
        np.testing.assert_array_equal(models.head_features(one, t), one[:, 0])
    with pytest.raises(ValueError, match="1 or 25 fingerprints"):
        models.head_features(feats[:, :3], l2)


def test_full_size_parameter_counts():
    """Counted with jax.eval_shape: nothing is allocated."""
    assert models.param_counts(models.model_config("adaparse")) == {"fen": 150_778_499,
                                                                    "parser": 4_079_605}
    assert models.param_counts(models.model_config("renet"))["fen"] == 559_363


def test_parameter_counts_match_reference_file(shared_dir):
    import json
    ref = json.loads((shared_dir / "reference" / "official_state_dicts.json").read_text())
    ada = models.param_counts(models.model_config("adaparse"))
    assert ada == {"fen": ref["adaparse_fen_num_params"], "parser": ref["adaparse_parser_num_params"]}
    assert models.param_counts(models.model_config("renet"))["fen"] == ref["renet_fen_num_params"]


def test_real_init_uses_official_initialisers():
    """flax's own init (elsewhere variables are filled with NumPy) follows the official code:
    Xavier-uniform codes, kaiming_normal_ DnCNN convolutions, torch's default U(+-1/sqrt(fan_in))
    for linear layers and every bias, BatchNorm scale 1 and running variance 1.

    Only small modules are initialised: compiling the random initialisers of the whole model
    takes tens of seconds on a CPU, and `variable_shapes` already traces it.
    """
    cfg = tiny()
    hyper = models.DualEncoder(width=cfg.width, code_dim=cfg.code_dim, hidden_dim=cfg.hidden_dim,
                               use_instance_code=False)
    f_latent = jnp.zeros((B, 8, 8, cfg.width))
    variables = jax.jit(lambda x: hyper.init(jax.random.key(0), x, train=False))(f_latent)
    params = variables["params"]
    for name, rows in (("z_b", 1), ("z_hp", targets.NUM_HEADS)):
        bound = math.sqrt(6 / (rows + cfg.code_dim))
        z = np.asarray(params[name])
        assert z.shape == (rows, cfg.code_dim) and bound * 0.5 < np.abs(z).max() <= bound
    for layer, fan_in in (("fc1", 2 * cfg.code_dim), ("fc2", cfg.hidden_dim)):  # z_b, z_hp
        for leaf in ("kernel", "bias"):
            w = np.abs(np.asarray(params["fusion"][layer][leaf]))
            assert 0.8 / math.sqrt(fan_in) < w.max() <= 1 / math.sqrt(fan_in), (layer, leaf)
    np.testing.assert_array_equal(params["fusion"]["bn"]["scale"], 1)
    np.testing.assert_array_equal(variables["batch_stats"]["fusion"]["bn"]["var"], 1)

    fen = models.dncnn_fen(width=16, depth=3)
    p = jax.jit(lambda x: fen.init(jax.random.key(1), x))(jnp.zeros((1, 8, 8, 3)))["params"]
    kernel = np.asarray(p["block1"]["conv"]["kernel"])
    assert abs(kernel.std() / math.sqrt(2 / (9 * 16)) - 1) < 0.15
    assert np.abs(kernel).max() > 3 * math.sqrt(2 / (9 * 16))  # a normal, not truncated at 2 std
    assert 0 < np.abs(p["block1"]["conv"]["bias"]).max() <= 1 / math.sqrt(9 * 16)


def fusion_module(cfg):
    return models.BroadcastedFusion(cfg.width, cfg.hidden_dim, cfg.fusion)


def fusion_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d = cfg.code_dim
    return (jnp.asarray(rng.standard_normal((1, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((targets.NUM_HEADS, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, d)), jnp.float32))


def test_batched_weight_generation_equals_per_target_loop():
    cfg = tiny()
    fusion = fusion_module(cfg)
    z_b, z_hp, z_it = fusion_inputs(cfg)
    kw = dict(batch_size=B, train=False)
    v = fusion.init(jax.random.key(0), z_b, z_hp, z_it, num_targets=targets.NUM_HEADS, **kw)
    v = jax.tree_util.tree_map(  # non-trivial running statistics
        lambda x: x + 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, v)
    w = fusion.apply(v, z_b, z_hp, z_it, num_targets=targets.NUM_HEADS, **kw)
    assert w.shape == (B, targets.NUM_HEADS, cfg.width, cfg.width)
    for t in range(targets.NUM_HEADS):
        w_t = fusion.apply(v, z_b, z_hp[t:t + 1], z_it, num_targets=1, **kw)
        np.testing.assert_allclose(w[:, t], w_t[:, 0], rtol=1e-6, atol=1e-7)

    # NumPy reference of the official MLP and reshape: W[b, t, o, i] = y[b, t, o * C + i].
    p, s = v["params"], v["batch_stats"]
    code = np.concatenate([np.broadcast_to(z_b[None], (B, targets.NUM_HEADS, cfg.code_dim)),
                           np.broadcast_to(z_hp[None], (B, targets.NUM_HEADS, cfg.code_dim)),
                           np.broadcast_to(z_it[:, None], (B, targets.NUM_HEADS, cfg.code_dim))], -1)
    h = code @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
    h = (h - s["bn"]["mean"]) / np.sqrt(s["bn"]["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    y = np.maximum(h, 0) @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
    y = 1 / (1 + np.exp(-y))
    np.testing.assert_allclose(w, y.reshape(B, targets.NUM_HEADS, cfg.width, cfg.width),
                               rtol=1e-4, atol=1e-6)


def test_fusion_batchnorm_sees_all_rows_in_training():
    """In training the fusion BatchNorm normalises over all B * T rows at once, as official."""
    cfg = tiny()
    fusion = fusion_module(cfg)
    z_b, z_hp, z_it = fusion_inputs(cfg)
    v = fusion.init(jax.random.key(0), z_b, z_hp, z_it, batch_size=B, num_targets=25, train=False)
    _, upd = fusion.apply(v, z_b, z_hp, z_it, batch_size=B, num_targets=25, train=True,
                          mutable=["batch_stats"])
    p = v["params"]
    code = np.concatenate([np.broadcast_to(z_b[None], (B, 25, cfg.code_dim)),
                           np.broadcast_to(z_hp[None], (B, 25, cfg.code_dim)),
                           np.broadcast_to(z_it[:, None], (B, 25, cfg.code_dim))], -1)
    h = (code @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])).reshape(-1, cfg.hidden_dim)
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)


def test_batchnorm_matches_torch_semantics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 3, 4)).astype(np.float32) * 2 + 1
    bn = models.BatchNorm()
    v = bn.init(jax.random.key(0), x, train=False)
    v = {"params": {"scale": jnp.array([0.5, 1, 1.5, 2.0]), "bias": jnp.array([0.1, 0, -0.1, 0.2])},
         "batch_stats": v["batch_stats"]}
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    flat = x.reshape(-1, 4).astype(np.float64)
    mean, var = flat.mean(0), flat.var(0)
    expected = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(v["params"]["scale"]) + np.asarray(
        v["params"]["bias"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    n = flat.shape[0]  # torch stores the unbiased variance, with momentum 0.1
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    y_eval = bn.apply({"params": v["params"], "batch_stats": upd["batch_stats"]}, x, train=False)
    ref = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var * n / (n - 1) + 1e-5) * np.asarray(
        v["params"]["scale"]) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)


def _capture_adaptive_input(cfg, variables, x):
    """Inputs of the adaptive run (the folded streams) and the hypernetwork's W, by interception."""
    seen = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in ("adaptive", "hypernet"):
            seen[context.module.name] = (args, out)
        if context.method_name == "__call__" and context.module.name == "middle":
            seen["middle"] = (args, out)
        return out

    model = models.build_model(cfg)
    with nn.intercept_methods(spy):
        model.apply(variables, x, train=False)
    return seen


def test_channel_mixing_follows_official_layout(adaparse_run):
    """The folded streams equal the official F.linear(y[b], W[b].reshape(T * C, C)) per sample."""
    cfg, variables, x, _ = adaparse_run
    seen = _capture_adaptive_input(cfg, variables, x)
    y = np.asarray(seen["middle"][1])  # [B, H, W, C]
    w = np.asarray(seen["hypernet"][1])  # [B, T, C, C]
    streams = np.asarray(seen["adaptive"][0][0])  # [B * T, H, W, C]
    b, h, wd, c = y.shape
    t = targets.NUM_HEADS
    for i in range(b):
        official = y[i] @ w[i].reshape(t * c, c).T  # [H, W, T * C]: channel t * C + o
        official = official.reshape(h, wd, t, c).transpose(2, 0, 1, 3)
        np.testing.assert_allclose(streams.reshape(b, t, h, wd, c)[i], official, rtol=1e-4, atol=1e-5)


def test_the_25_fingerprints_of_one_image_differ(adaparse_run):
    _, _, _, out = adaparse_run
    fp = np.asarray(out["fingerprints"][0]).reshape(targets.NUM_HEADS, -1)
    dist = np.linalg.norm(fp[:, None] - fp[None], axis=-1)
    scale = np.linalg.norm(fp, axis=-1).mean()
    off_diag = dist[~np.eye(targets.NUM_HEADS, dtype=bool)]
    assert off_diag.min() > 1e-3 * scale


def test_without_hp_code_all_targets_share_one_fingerprint():
    cfg = tiny(use_hp_code=False)
    variables = numpy_variables(cfg)
    assert "z_hp" not in variables["params"]["fen"]["hypernet"]
    out, _ = apply(cfg, variables, images(cfg))
    fp = np.asarray(out["fingerprints"])
    np.testing.assert_allclose(fp, np.broadcast_to(fp[:, :1], fp.shape), rtol=1e-5, atol=1e-6)


def test_without_instance_code_the_weights_ignore_the_image():
    cfg = tiny(use_instance_code=False)
    variables = numpy_variables(cfg)
    assert "instance_encoder" not in variables["params"]["fen"]["hypernet"]
    w0 = _capture_adaptive_input(cfg, variables, images(cfg, seed=0))["hypernet"][1]
    w1 = _capture_adaptive_input(cfg, variables, images(cfg, seed=1))["hypernet"][1]
    np.testing.assert_allclose(w0, w1, rtol=1e-6)
    assert not np.allclose(w0[:, 0], w0[:, 1])  # still one matrix per target


@pytest.mark.parametrize("overrides,codes,fc1_in", [
    ({}, {"z_b", "z_hp"}, 3 * 16),
    ({"use_base_code": False}, {"z_hp"}, 2 * 16),
    ({"fusion": "add"}, {"z_b", "z_hp"}, 16),
    ({"fusion": "add", "use_instance_code": False}, {"z_b", "z_hp"}, 16),
    ({"code_dim": 24}, {"z_b", "z_hp"}, 3 * 24),
])
def test_code_and_fusion_overrides_change_the_parameter_tree(overrides, codes, fc1_in):
    cfg = tiny(**overrides)
    hyper = models.variable_shapes(cfg)["params"]["fen"]["hypernet"]
    assert {k for k in hyper if k.startswith("z_")} == codes
    assert hyper["fusion"]["fc1"]["kernel"].shape == (fc1_in, cfg.hidden_dim)
    assert all(hyper[z].shape[-1] == cfg.code_dim for z in codes)


def test_attention_fusion_and_hidden_dim():
    cfg = tiny(fusion="attention", hidden_dim=40)
    variables = numpy_variables(cfg)
    fusion = variables["params"]["fen"]["hypernet"]["fusion"]
    assert {"query", "key", "value"} <= set(fusion)
    assert fusion["fc1"]["kernel"].shape == (cfg.code_dim, 40)
    out, _ = apply(cfg, variables, images(cfg))
    fp = np.asarray(out["fingerprints"][0]).reshape(targets.NUM_HEADS, -1)
    assert np.linalg.norm(fp[0] - fp[1]) > 1e-3 * np.linalg.norm(fp[0])


def test_source_and_inject_blocks_move_the_personalisation(adaparse_run):
    """Same block weights, hypernetwork fed and mixing applied elsewhere: other fingerprints."""
    cfg, variables, x, out = adaparse_run
    moved = tiny(source_block=1, inject_block=3)
    fen = variables["params"]["fen"]
    stats = variables["batch_stats"]["fen"]
    blocks = {k: v for run in ("shared", "middle", "adaptive") for k, v in fen[run].items()}
    block_stats = {k: v for run in ("shared", "middle", "adaptive") for k, v in stats[run].items()}

    def regroup(tree_blocks, extra):
        runs = {"shared": range(1, 2), "middle": range(2, 4), "adaptive": range(4, moved.depth - 1)}
        out = {run: {f"block{i}": tree_blocks[f"block{i}"] for i in r} for run, r in runs.items()}
        for run, names in extra.items():
            out[run].update({n: tree_blocks[n] for n in names})
        return out

    params = regroup(blocks, {"shared": ["stem"], "adaptive": ["final"]})
    params["hypernet"] = fen["hypernet"]
    bstats = regroup(block_stats, {})
    bstats["hypernet"] = stats["hypernet"]
    new_vars = {"params": {"fen": params, "parser": variables["params"]["parser"]},
                "batch_stats": {"fen": bstats}}
    shapes = models.variable_shapes(moved)
    assert (jax.tree_util.tree_structure(new_vars) == jax.tree_util.tree_structure(shapes))
    out_moved, _ = apply(moved, new_vars, x)
    a, b = np.asarray(out["fingerprints"]), np.asarray(out_moved["fingerprints"])
    assert np.linalg.norm(a - b) > 1e-2 * np.linalg.norm(a)


@pytest.mark.parametrize("arch", ["adaparse", "renet"])
def test_width_depth_and_image_size_overrides(arch):
    cfg = tiny(arch, width=12, depth=9, image_size=16, source_block=3, inject_block=5)
    shapes = models.variable_shapes(cfg)["params"]
    fen = shapes["fen"]
    if arch == "adaparse":
        blocks = [k for run in ("shared", "middle", "adaptive") for k in fen[run] if k.startswith("block")]
        assert fen["middle"]["block4"]["conv"]["kernel"].shape == (3, 3, 12, 12)
        assert fen["hypernet"]["fusion"]["fc2"]["kernel"].shape[-1] == 12 * 12
        # 3 max-pools: 16 -> 2, so fc1 reads 2 * 2 * last extractor channels
        assert fen["hypernet"]["instance_encoder"]["fc1"]["kernel"].shape[0] == 4 * cfg.extractor_features[-1]
    else:
        blocks = [k for k in fen if k.startswith("block")]
    assert len(blocks) == cfg.depth - 2
    # parser at 16 px: 16 -> 18/9 -> 11/5 -> 7/3 -> 5/2 -> 4/2: 2 * 2 * last conv channels
    assert shapes["parser"]["fc1"]["kernel"].shape[0] == 4 * cfg.parser_conv_features[-1]


@pytest.mark.parametrize("field,value,match", [
    ("fusion", "sum", "fusion"),
    ("dtype", "float16", "dtype"),
    ("arch", "gan", "arch"),
    ("source_block", 5, "source_block"),
    ("inject_block", 1, "inject_block"),
    ("depth", 1, "depth"),
    ("extractor_features", (), "extractor_features"),
    ("dropout", 1.0, "dropout"),
])
def test_invalid_config_names_the_field(field, value, match):
    cfg = tiny()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        models.build_model(cfg)


def test_unknown_config_field_and_no_codes():
    cfg = tiny()
    cfg.unlock()
    cfg.widht = 3
    with pytest.raises(ValueError, match="widht"):
        models.build_model(cfg)
    with pytest.raises(ValueError, match="use_instance_code"):
        models.build_model(tiny(use_instance_code=False, use_base_code=False, use_hp_code=False))
    with pytest.raises(ValueError, match="image_size"):
        models.build_model(tiny(image_size=4))


def test_wrong_image_size_is_reported(adaparse_run):
    cfg, variables, _, _ = adaparse_run
    with pytest.raises(ValueError, match="image_size"):
        models.build_model(cfg).apply(variables, jnp.zeros((1, 16, 16, 3)))


def test_bfloat16_compute_keeps_float32_params(adaparse_run):
    cfg, variables, x, out32 = adaparse_run
    cfg16 = tiny(dtype="bfloat16")
    shapes = models.variable_shapes(cfg16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out16, upd = apply(cfg16, variables, x, train=False)
    assert out16["fingerprints"].dtype == jnp.bfloat16
    assert out16["continuous"].dtype == jnp.float32 and out16["probs"]["l1"].dtype == jnp.float32
    a = np.asarray(out16["fingerprints"], np.float32)
    b = np.asarray(out32["fingerprints"])
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)
    np.testing.assert_allclose(out16["continuous"], out32["continuous"], atol=0.05)


def test_parser_explicit_padding_is_the_same_function():
    """jnp.pad + VALID convolutions (the default, fast on XLA:CPU) equal padding=2: values and grads."""
    cfg = tiny("renet")
    variables = numpy_variables(cfg)
    x = images(cfg)

    def loss(params, padded):
        model = models.build_model(tiny("renet", parser_explicit_padding=padded))
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return out["continuous"].sum() + sum(p.sum() for p in out["probs"].values())

    explicit, grads_explicit = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(variables["params"])
    implicit, grads_implicit = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(variables["params"])
    np.testing.assert_allclose(explicit, implicit, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_explicit), jax.tree_util.tree_leaves(grads_implicit)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
