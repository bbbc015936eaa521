"""Losses and spectra against NumPy references, the official class weights and the parity file."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_or_fail

from adaparse_jax import losses, spectral, targets

# ------------------------------------------------------------------------------------------------
# Independent NumPy references (written from the reference README, not from the package).


def np_spectra(fp: np.ndarray, n: int) -> dict:
    """fp [N, H, W, 3] float64; n is the (already clamped) window half size."""
    gray = 0.299 * fp[..., 0] + 0.587 * fp[..., 1] + 0.114 * fp[..., 2]
    f = np.fft.fft2(gray)
    spec = np.sqrt(np.maximum(np.abs(f) ** 2, 1e-4))
    # Official shift: each axis split at size // 2, back part first.
    for axis in (1, 2):
        k = spec.shape[axis] // 2
        spec = np.concatenate([np.take(spec, range(k, spec.shape[axis]), axis),
                               np.take(spec, range(k), axis)], axis)
    h, w = gray.shape[1:]
    r0, c0 = h // 2 - n, w // 2 - n
    low = spec[:, r0:r0 + 2 * n + 1, c0:c0 + 2 * n + 1]
    zeroed = spec.copy()
    zeroed[:, r0:r0 + 2 * n + 1, c0:c0 + 2 * n + 1] = 0
    return {"gray": gray, "fft": f, "spectrum": spec, "spectrum_transposed": spec.transpose(0, 2, 1),
            "lowfreq": low, "highfreq_max": zeroed.max()}


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_weighted_ce(logits, labels, w):
    """torch.nn.CrossEntropyLoss(weight=w) with the default 'mean' reduction."""
    nll = -np_log_softmax(np.asarray(logits, np.float64))[np.arange(len(labels)), labels]
    wy = np.asarray(w, np.float64)[labels]
    return (wy * nll).sum() / wy.sum()


def np_gated_log_probs(flag_logits, group_logits):
    q = np.exp(np_log_softmax(np.asarray(flag_logits, np.float64)))
    g = np.exp(np_log_softmax(np.asarray(group_logits, np.float64)))
    used = g[:, 1] * q[:, 1]
    return np.log(np.stack([1 - used, used], -1))


def np_total(outputs, labels, class_weights, *, n, ce_input="probs", lam=10.0, threshold=10000.0):
    fp = np.asarray(outputs["fingerprints"], np.float64)
    s = np_spectra(fp.reshape((-1,) + fp.shape[2:]), n)
    terms = {
        "magnitude": 0.1 * np.mean(s["gray"] ** 2),
        "spectrum": 0.05 * np.mean(s["lowfreq"] ** 2),
        "repetitive": -0.001 * min(s["highfreq_max"], threshold),
        "energy": np.mean((s["spectrum"] - s["spectrum_transposed"]) ** 2),
        "continuous": lam * np.mean((np.asarray(outputs["continuous"], np.float64)
                                     - labels["continuous"]) ** 2),
    }
    for t in targets.CLASSIFICATION_TARGETS:
        if ce_input == "probs":
            x = outputs["probs"][t.name]
        elif t.kind == targets.FLAG:
            x = np_gated_log_probs(outputs["logits"][t.name], outputs["logits"][t.group])
        else:
            x = outputs["logits"][t.name]
        terms[t.name] = lam * np_weighted_ce(x, labels[t.name], class_weights[t.name])
    terms["total"] = sum(terms.values())
    return terms


# ------------------------------------------------------------------------------------------------
# Random model outputs and labels.


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def random_label_rows(rng, num):
    """[num, 28] label rows built from random official-format tables."""
    net = np.concatenate([rng.uniform(size=(num, 9))] + [
        rng.integers(0, t.num_classes, (num, 1)) for t in targets.DISCRETE_TARGETS], axis=1)
    return targets.label_matrix({targets.NET_TABLE: net,
                                 targets.LOSS10_TABLE: rng.integers(0, 2, (num, 10)),
                                 targets.LOSS3_TABLE: rng.integers(0, 2, (num, 3))})


def random_batch(seed=0, batch=4, num_fp=3, size=16, fp_scale=0.3):
    rng = np.random.default_rng(seed)
    logits = {t.name: rng.normal(0, 2, (batch, t.num_classes)).astype(np.float32)
              for t in targets.CLASSIFICATION_TARGETS}
    probs = {}
    for t in targets.CLASSIFICATION_TARGETS:
        p = sigmoid(logits[t.name])
        if t.kind == targets.FLAG:
            p = p * sigmoid(logits[t.group][:, 1:2])
        probs[t.name] = p.astype(np.float32)
    outputs = {
        "fingerprints": (fp_scale * rng.standard_normal((batch, num_fp, size, size, 3))).astype(np.float32),
        "continuous": rng.uniform(size=(batch, 9)).astype(np.float32),
        "logits": logits,
        "probs": probs,
    }
    rows = random_label_rows(rng, batch)
    labels = targets.split_labels(rows)
    weights = {t.name: rng.uniform(0.5, 20, t.num_classes).astype(np.float32)
               for t in targets.CLASSIFICATION_TARGETS}
    return outputs, labels, weights


def assert_terms_close(terms, ref, rtol=1e-5, atol=1e-6):
    assert list(terms) == list(ref)
    for k in ref:
        np.testing.assert_allclose(float(terms[k]), ref[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------------------------
# Spectra.


@pytest.mark.parametrize("size,requested,expected", [
    (64, 25, 25), (32, 25, 15), (16, 25, 7), (17, 25, 8), (64, 10, 10), (20, 0, 0)])
def test_window_half_size_clamps_to_fit(size, requested, expected):
    assert spectral.clamped_half_size(size, size, requested) == expected


def test_window_is_official_at_64px():
    rows, cols = spectral.lowfreq_slices(64, 64, spectral.clamped_half_size(64, 64))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (7, 58, 7, 58)


def test_negative_window_raises():
    with pytest.raises(ValueError, match="lowfreq_half_size"):
        spectral.fingerprint_spectra(np.zeros((1, 16, 16, 3)), lowfreq_half_size=-1)


@pytest.mark.parametrize("size,width,requested", [(16, 16, 25), (17, 17, 5), (15, 20, 4), (24, 24, 25)])
def test_spectra_match_numpy(size, width, requested):
    fp = np.random.default_rng(size).standard_normal((3, size, width, 3)).astype(np.float32)
    got = spectral.fingerprint_spectra(fp, lowfreq_half_size=requested)
    ref = np_spectra(fp.astype(np.float64), spectral.clamped_half_size(size, width, requested))
    assert got["fft"].dtype == jnp.complex64
    for k in ref:
        assert got[k].shape == np.shape(ref[k]), k
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=2e-5, atol=2e-5, err_msg=k)


def test_odd_size_uses_official_shift_not_numpy_fftshift():
    fp = np.random.default_rng(1).standard_normal((1, 9, 9, 3))
    spec = np.asarray(spectral.fingerprint_spectra(fp)["spectrum"])[0]
    raw = np.sqrt(np.maximum(np.abs(np.fft.fft2(0.299 * fp[0, ..., 0] + 0.587 * fp[0, ..., 1]
                                                + 0.114 * fp[0, ..., 2])) ** 2, 1e-4))
    np.testing.assert_allclose(spec, np.fft.ifftshift(raw), rtol=1e-5)
    assert not np.allclose(spec, np.fft.fftshift(raw), rtol=1e-3)


def test_window_covering_the_image_gives_zero_highfreq_max():
    fp = np.random.default_rng(2).standard_normal((2, 17, 17, 3))
    assert float(spectral.fingerprint_spectra(fp)["highfreq_max"]) == 0.0


def test_spectra_run_in_float32_for_bf16_input():
    fp = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.bfloat16)
    got = spectral.fingerprint_spectra(fp)
    for k in ("gray", "spectrum", "lowfreq", "highfreq_max"):
        assert got[k].dtype == jnp.float32, k
    ref = np_spectra(np.asarray(fp.astype(jnp.float32), np.float64), 7)
    np.testing.assert_allclose(np.asarray(got["spectrum"]), ref["spectrum"], rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# Elementary losses.


def test_weighted_cross_entropy_matches_torch_semantics():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (7, 4))
    labels = np.array([0, 1, 1, 3, 3, 3, 2])
    w = np.array([116 / 72, 116 / 19, 116 / 19, 116 / 6])
    got = losses.weighted_cross_entropy(logits=logits, labels=labels, class_weights=w)
    np.testing.assert_allclose(float(got), np_weighted_ce(logits, labels, w), rtol=1e-6)
    # The weighted mean is not the mean of weighted losses: equal weights give the plain mean.
    plain = losses.weighted_cross_entropy(logits=logits, labels=labels, class_weights=np.full(4, 3.0))
    np.testing.assert_allclose(float(plain), -np_log_softmax(logits)[np.arange(7), labels].mean(), rtol=1e-6)
    assert not np.isclose(float(got), float(plain))


def test_weighted_cross_entropy_zero_weight_batch_is_zero_not_nan():
    got = losses.weighted_cross_entropy(logits=np.ones((2, 2)), labels=np.array([1, 1]),
                                        class_weights=np.array([1.0, 0.0]))
    assert float(got) == 0.0


def test_gated_flag_log_probs_match_numpy_and_normalise():
    rng = np.random.default_rng(4)
    f, g = rng.normal(0, 4, (6, 2)), rng.normal(0, 4, (6, 2))
    got = np.asarray(losses.gated_flag_log_probs(flag_logits=f, group_logits=g))
    np.testing.assert_allclose(got, np_gated_log_probs(f, g), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-6)
    # Gating matters: a group certain to be unused forces the flag to "unused".
    closed = np.asarray(losses.gated_flag_log_probs(flag_logits=[[-9.0, 9.0]], group_logits=[[30.0, -30.0]]))
    assert np.exp(closed[0, 1]) < 1e-12


@pytest.mark.parametrize("call,match", [
    (lambda: losses.weighted_cross_entropy(logits=np.zeros((3, 4)), labels=np.zeros(2, int),
                                           class_weights=np.ones(4)), "labels"),
    (lambda: losses.weighted_cross_entropy(logits=np.zeros((3, 4)), labels=np.zeros(3, int),
                                           class_weights=np.ones(2)), "class_weights"),
    (lambda: losses.weighted_cross_entropy(logits=np.zeros(4), labels=np.zeros(4, int),
                                           class_weights=np.ones(4)), "logits"),
    (lambda: losses.weighted_cross_entropy(logits=np.zeros((3, 2)), labels=np.zeros(3),
                                           class_weights=np.ones(2)), "integer"),
    (lambda: losses.mean_squared_error(predictions=np.zeros((2, 9)), targets=np.zeros((2, 8))), "same shape"),
    (lambda: losses.gated_flag_log_probs(flag_logits=np.zeros((2, 2)), group_logits=np.zeros((3, 2))),
     "group_logits"),
])
def test_elementary_shape_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# total_loss.


def test_total_loss_default_matches_numpy():
    outputs, labels, weights = random_batch(seed=0)
    total, terms = losses.total_loss(outputs, labels, weights, loss_config=losses.default_loss_config())
    ref = np_total(outputs, labels, weights, n=7)
    keys = ["magnitude", "spectrum", "repetitive", "energy", "continuous"] + [
        t.name for t in targets.CLASSIFICATION_TARGETS] + ["total"]
    assert list(terms) == keys
    assert_terms_close(terms, ref)
    assert float(total) == float(terms["total"])
    assert all(v.dtype == jnp.float32 for v in terms.values())


def test_total_loss_logits_option_matches_numpy_and_differs():
    outputs, labels, weights = random_batch(seed=1)
    cfg = losses.default_loss_config()
    cfg.ce_input = "logits"
    _, terms = losses.total_loss(outputs, labels, weights, loss_config=cfg)
    assert_terms_close(terms, np_total(outputs, labels, weights, n=7, ce_input="logits"))
    _, default = losses.total_loss(outputs, labels, weights)
    for t in targets.CLASSIFICATION_TARGETS:
        assert not np.isclose(float(terms[t.name]), float(default[t.name]), rtol=1e-3), t.name
    for k in ("magnitude", "spectrum", "repetitive", "energy", "continuous"):
        assert float(terms[k]) == float(default[k])


def test_logits_option_needs_no_probs_and_default_needs_no_logits():
    outputs, labels, weights = random_batch(seed=2)
    cfg = losses.default_loss_config()
    cfg.ce_input = "logits"
    losses.total_loss({k: v for k, v in outputs.items() if k != "probs"}, labels, weights, loss_config=cfg)
    losses.total_loss({k: v for k, v in outputs.items() if k != "logits"}, labels, weights)
    with pytest.raises(KeyError, match="logits"):
        losses.total_loss({k: v for k, v in outputs.items() if k != "logits"}, labels, weights,
                          loss_config=cfg)


def test_config_fields_change_the_terms():
    outputs, labels, weights = random_batch(seed=3, fp_scale=3.0)
    cfg = losses.default_loss_config()
    cfg.prediction_weight = 2.5
    cfg.repetitive_threshold = 1.0  # below the batch's high-frequency maximum: the cap is active
    cfg.lowfreq_half_size = 4
    cfg.magnitude_weight, cfg.spectrum_weight, cfg.repetitive_weight, cfg.energy_weight = 1.0, 2.0, 3.0, 4.0
    _, terms = losses.total_loss(outputs, labels, weights, loss_config=cfg)
    ref = np_total(outputs, labels, weights, n=4, lam=2.5, threshold=1.0)
    ref["magnitude"] *= 10.0
    ref["spectrum"] *= 40.0
    ref["repetitive"] *= 3000.0
    ref["energy"] *= 4.0
    ref["total"] = sum(v for k, v in ref.items() if k != "total")
    assert_terms_close(terms, ref)
    assert float(terms["repetitive"]) == -3.0


@pytest.mark.parametrize("ce_input", losses.CE_INPUTS)
def test_total_loss_jit_equals_eager(ce_input):
    outputs, labels, weights = random_batch(seed=4)
    cfg = losses.default_loss_config()
    cfg.ce_input = ce_input
    fn = functools.partial(losses.total_loss, loss_config=cfg)
    _, eager = fn(outputs, labels, weights)
    _, jitted = jax.jit(fn)(outputs, labels, weights)
    for k in eager:
        np.testing.assert_allclose(float(jitted[k]), float(eager[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_bf16_fingerprints_give_float32_constraints():
    outputs, labels, weights = random_batch(seed=5)
    bf16 = dict(outputs, fingerprints=jnp.asarray(outputs["fingerprints"], jnp.bfloat16))
    _, terms = losses.total_loss(bf16, labels, weights)
    rounded = dict(outputs, fingerprints=np.asarray(bf16["fingerprints"].astype(jnp.float32)))
    ref = np_total(rounded, labels, weights, n=7)
    for k in losses.CONSTRAINT_TERMS:
        assert terms[k].dtype == jnp.float32
        np.testing.assert_allclose(float(terms[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("ce_input", losses.CE_INPUTS)
def test_gradients_finite(ce_input):
    outputs, labels, weights = random_batch(seed=6)
    cfg = losses.default_loss_config()
    cfg.ce_input = ce_input
    grads = jax.grad(lambda o: losses.total_loss(o, labels, weights, loss_config=cfg)[0])(
        {k: outputs[k] for k in ("fingerprints", "continuous", ce_input)})
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.abs(np.asarray(grads["fingerprints"])).sum() > 0


def _broken(outputs, path, value):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in outputs.items()}
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]][path[1]] = value
    return out


@pytest.mark.parametrize("path,shape,match", [
    (("fingerprints",), (4, 3, 16, 16), "fingerprints"),
    (("fingerprints",), (4, 3, 16, 12, 3), "fingerprints"),
    (("fingerprints",), (5, 3, 16, 16, 3), "batch"),
    (("continuous",), (4, 8), "continuous"),
    (("probs", "normalization"), (4, 2), "normalization"),
    (("probs", "l1"), (3, 2), "l1"),
])
def test_total_loss_shape_errors(path, shape, match):
    outputs, labels, weights = random_batch(seed=7)
    with pytest.raises(ValueError, match=match):
        losses.total_loss(_broken(outputs, path, np.zeros(shape, np.float32)), labels, weights)


def test_label_and_weight_errors():
    outputs, labels, weights = random_batch(seed=8)
    with pytest.raises(ValueError, match="labels"):
        losses.total_loss(outputs, dict(labels, skip=labels["skip"][:2]), weights)
    with pytest.raises(ValueError, match="class_weights"):
        losses.total_loss(outputs, labels, dict(weights, skip=np.ones(3, np.float32)))
    with pytest.raises(KeyError, match="kl"):
        losses.total_loss(outputs, labels, {k: v for k, v in weights.items() if k != "kl"})
    cfg = losses.default_loss_config()
    cfg.ce_input = "softmax"
    with pytest.raises(ValueError, match="loss_config.ce_input"):
        losses.total_loss(outputs, labels, weights, loss_config=cfg)


# ------------------------------------------------------------------------------------------------
# Official class weights and the parity file (need ../shared).

OFFICIAL_COUNTS = {
    "normalization": [72, 19, 19, 6], "nonlin_block": [10, 74, 8, 24], "nonlin_last": [15, 74, 24, 3],
    "upsampling": [80, 36], "skip": [39, 77], "downsampling": [67, 49],
    "loss_group1": [32, 84], "loss_group2": [75, 41], "loss_group3": [67, 49],
    "l1": [71, 45], "l2": [95, 21], "mse": [102, 14], "mmd": [112, 4], "ls": [71, 45],
    "wgan": [102, 14], "kl": [102, 14], "adversarial": [110, 6], "hinge": [105, 11], "ce": [67, 49],
}


def re116_matrix(shared_dir):
    d = shared_dir / "reference" / "re116"
    names = (d / "models.txt").read_text().split()
    m = targets.label_matrix({
        targets.NET_TABLE: np.load(d / "ground_truth_net_116_15dim.npy"),
        targets.LOSS10_TABLE: np.load(d / "ground_truth_loss_116_9dim.npy"),
        targets.LOSS3_TABLE: np.load(d / "ground_truth_loss_116_3dim.npy"),
    })
    assert len(names) == len(m) == 116
    return m


def test_class_weights_equal_official_literals(shared_dir):
    weights = targets.class_weights(re116_matrix(shared_dir))
    assert set(weights) == set(OFFICIAL_COUNTS)
    for name, counts in OFFICIAL_COUNTS.items():
        np.testing.assert_allclose(weights[name], 116 / np.asarray(counts, np.float64), rtol=1e-6,
                                   err_msg=name)


PARITY_DIR = "reference/parity"


def load_parity(shared_dir, name):
    path = shared_dir / PARITY_DIR / name
    if not path.exists():
        skip_or_fail(f"{path} not found")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def parity(shared_dir):
    return load_parity(shared_dir, "adaparse_parity_seed1000.npz")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("mode", ["trainbn", "eval"])
@pytest.mark.parametrize("file,stem", [("adaparse_parity_seed1000.npz", "fingerprints"),
                                       ("renet_parity_seed1000.npz", "fingerprint")])
def test_spectra_reproduce_parity_files(shared_dir, file, stem, mode):
    data = load_parity(shared_dir, file)
    s = spectral.fingerprint_spectra(data[f"{mode}/fen/{stem}"].transpose(0, 2, 3, 1))
    fft = np.stack([np.real(s["fft"]), np.imag(s["fft"])], -1)
    pairs = {f"{stem}_gray": s["gray"], "fft_realimag": fft, "spectrum": s["spectrum"],
             "spectrum_transposed": s["spectrum_transposed"], "spectrum_lowfreq": s["lowfreq"],
             "spectrum_highfreq_max": s["highfreq_max"]}
    for key, got in pairs.items():
        ref = data[f"{mode}/fen/{key}"]
        assert np.shape(got) == ref.shape, key
        assert rel_err(got, ref) <= 1e-5, key


def parity_term_name(name):
    """Our term names -> the parity file's (flags are numbered there)."""
    t = targets.BY_NAME.get(name)
    return f"loss_flag{t.column + 1}" if t is not None and t.kind == targets.FLAG else name


def test_total_loss_reproduces_parity_terms(parity, shared_dir):
    b = len(parity["label_rows"])
    rows = targets.label_matrix({targets.NET_TABLE: parity["gt_net"], targets.LOSS10_TABLE: parity["gt_loss10"],
                                 targets.LOSS3_TABLE: parity["gt_loss3"]})
    # The stored gt rows are those of the named label rows of the official tables.
    np.testing.assert_array_equal(rows, re116_matrix(shared_dir)[parity["label_rows"]])
    fp = parity["trainbn/fen/fingerprints"]  # [T * B, 3, H, W], row = target * B + b
    fp = fp.reshape((targets.NUM_HEADS, b) + fp.shape[1:]).transpose(1, 0, 3, 4, 2)
    outputs = {
        "fingerprints": fp,
        "continuous": parity["trainbn/parser/continuous"],
        "probs": {t.name: parity[f"trainbn/parser/{parity_term_name(t.name)}"]
                  for t in targets.CLASSIFICATION_TARGETS},
    }
    weights = targets.class_weights(re116_matrix(shared_dir))
    _, terms = losses.total_loss(outputs, targets.split_labels(rows), weights)
    for name, value in terms.items():
        ref = float(parity[f"trainbn/loss/{parity_term_name(name)}"])
        assert abs(float(value) - ref) <= 1e-5 * abs(ref), (name, float(value), ref)
