"""Training losses of RE-Net and AdaParse: fingerprint constraints + weighted prediction losses.

total = magnitude + spectrum + repetitive + energy + lambda * (continuous + sum of the 19
class-weighted cross-entropies), with the official weights as defaults (`default_loss_config`):

  magnitude   0.1 * mean(gray^2)                     over all fingerprints (25 B in AdaParse, B in RE-Net)
  spectrum    0.05 * mean(lowfreq^2)                 the 51 x 51 centre of the shifted spectrum
  repetitive  -0.001 * min(highfreq_max, 10000)      rewards one strong high-frequency peak
  energy      1.0 * mean((spectrum - spectrum^T)^2)  asks for a symmetric spectrum
  continuous  lambda * mean((continuous - gt)^2)     lambda = 10
  <target>    lambda * weighted cross-entropy        6 discrete targets, 3 loss groups, 10 loss flags

The constraint terms always run in float32 (see `spectral`), whatever dtype the fingerprints have.

Cross-entropy input (`loss_config.ce_input`):

* 'probs' (default, official): the cross-entropy reads the model's `probs` as if they were logits,
  i.e. softmax over per-class sigmoids, flags multiplied by their group's P(used). This is what the
  official training script does; the loss is bounded below by a positive constant and its gradients
  are damped by the sigmoid, but it is the behaviour the published numbers come from.
* 'logits': a proper likelihood. Discrete targets and groups use softmax cross-entropy on the raw
  head outputs. A flag uses the log-probabilities of the gated binary model: with
  g = softmax(group logits)[used] and q = softmax(flag logits),
  P(flag used) = g * q[used] and P(flag unused) = (1 - g) + g * q[unused]. Adding log g to both
  flag logits would cancel in the softmax, so this is the form in which the gating still matters:
  a flag can only be predicted "used" when its group is.

Class weights (`targets.class_weights`) follow torch `CrossEntropyLoss(weight)`: the mean over the
batch is weighted, sum_i w[y_i] * nll_i / sum_i w[y_i].
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaparse_jax import spectral, targets

CE_INPUTS = ("probs", "logits")
LOWFREQ_WINDOWS = ("clamped", "scaled")
CONSTRAINT_TERMS = ("magnitude", "spectrum", "repetitive", "energy")
# Flags and groups predict "used" with class 1 (the official gating multiplies by group column 1).
USED = 1
UNUSED = 0


def default_loss_config() -> ml_collections.ConfigDict:
    """The official loss: weights of the four constraints, lambda = 10, cross-entropy on probs."""
    c = ml_collections.ConfigDict()
    c.magnitude_weight = 0.1
    c.spectrum_weight = 0.05
    c.repetitive_weight = 0.001  # the term is -weight * min(highfreq_max, threshold)
    c.repetitive_threshold = 10000.0
    c.energy_weight = 1.0
    c.lowfreq_half_size = spectral.DEFAULT_LOWFREQ_HALF_SIZE
    # 'clamped' (official at 64 px; below it the window is clamped to fit, `spectral.clamped_half_size`)
    # | 'scaled': the official 25/64 ratio at any size (`spectral.scaled_half_size`: 12 at 32 px).
    c.lowfreq_window = "clamped"
    # The four constraint weights are multiplied by constraint_scale * min(1, step / ramp_steps)
    # (ramp_steps 0: no ramp, the official constant weights). At initialisation the constraints'
    # gradient on the FEN is ~1e5 times that of the parsing losses (docs/EXPERIMENTS.md).
    c.constraint_scale = 1.0
    c.constraint_ramp_steps = 0
    c.prediction_weight = 10.0  # lambda: multiplies the continuous and every cross-entropy term
    c.ce_input = "probs"  # 'probs' (official quirk) or 'logits' (see the module docstring)
    return c


def _check_config(loss_config) -> ml_collections.ConfigDict:
    if loss_config is None:
        return default_loss_config()
    missing = [k for k in default_loss_config() if k not in loss_config]
    if missing:
        raise ValueError(f"loss_config is missing fields {missing}; start from default_loss_config()")
    if loss_config.ce_input not in CE_INPUTS:
        raise ValueError(f"loss_config.ce_input must be one of {CE_INPUTS}, got {loss_config.ce_input!r}")
    if loss_config.lowfreq_window not in LOWFREQ_WINDOWS:
        raise ValueError(f"loss_config.lowfreq_window must be one of {LOWFREQ_WINDOWS}, "
                         f"got {loss_config.lowfreq_window!r}")
    if not isinstance(loss_config.constraint_ramp_steps, int) or loss_config.constraint_ramp_steps < 0:
        raise ValueError("loss_config.constraint_ramp_steps must be an integer >= 0, got "
                         f"{loss_config.constraint_ramp_steps!r}")
    if not loss_config.constraint_scale >= 0:
        raise ValueError(f"loss_config.constraint_scale must be >= 0, got {loss_config.constraint_scale!r}")
    return loss_config


def constraint_factor(step, *, loss_config=None) -> jax.Array:
    """What the four constraint weights are multiplied by at optimiser step `step` (float32)."""
    cfg = _check_config(loss_config)
    factor = jnp.float32(cfg.constraint_scale)
    if cfg.constraint_ramp_steps:
        factor = factor * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.constraint_ramp_steps)
    return factor


def _shape_error(name: str, shape, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(shape)}; expected {expected}")


# ------------------------------------------------------------------------------------------------
# Elementary losses (keyword arguments, shape checks, float32).


def mean_squared_error(*, predictions, targets) -> jax.Array:
    """mean((predictions - targets)^2) over all elements; shapes must match exactly."""
    p = jnp.asarray(predictions, jnp.float32)
    t = jnp.asarray(targets, jnp.float32)
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must have the same shape")
    return jnp.mean(jnp.square(p - t))


def weighted_cross_entropy(*, logits, labels, class_weights) -> jax.Array:
    """torch `CrossEntropyLoss(weight)`: sum_i w[y_i] nll_i / sum_i w[y_i].

    Args:
      logits: [B, K] scores (softmax is taken over K).
      labels: [B] integer class ids in 0..K-1.
      class_weights: [K].

    Returns:
      scalar float32. Where every label of the batch has weight 0 (torch gives NaN) it is 0.
    """
    x = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels)
    w = jnp.asarray(class_weights, jnp.float32)
    if x.ndim != 2:
        raise _shape_error("logits", x.shape, "[B, K]")
    if y.shape != x.shape[:1]:
        raise _shape_error("labels", y.shape, f"[{x.shape[0]}] (one class id per row of logits)")
    if w.shape != x.shape[1:]:
        raise _shape_error("class_weights", w.shape, f"[{x.shape[1]}] (one weight per class)")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    nll = optax.softmax_cross_entropy_with_integer_labels(x, y)
    wy = w[y]
    den = jnp.sum(wy)
    return jnp.where(den > 0, jnp.sum(wy * nll) / jnp.where(den > 0, den, 1.0), 0.0)


def gated_flag_log_probs(*, flag_logits, group_logits) -> jax.Array:
    """[B, 2] log-probabilities (unused, used) of a flag under its group's gate.

    P(used) = P(group used) * P(flag used | group used); P(unused) = 1 - P(used), computed in log
    space so it stays finite when either factor saturates.
    """
    f = jnp.asarray(flag_logits, jnp.float32)
    g = jnp.asarray(group_logits, jnp.float32)
    if f.ndim != 2 or f.shape[1] != 2:
        raise _shape_error("flag_logits", f.shape, "[B, 2]")
    if g.shape != f.shape:
        raise _shape_error("group_logits", g.shape, f"{list(f.shape)} (same as flag_logits)")
    lf = jax.nn.log_softmax(f, axis=-1)
    lg = jax.nn.log_softmax(g, axis=-1)
    used = lg[:, USED] + lf[:, USED]
    unused = jnp.logaddexp(lg[:, UNUSED], lg[:, USED] + lf[:, UNUSED])
    return jnp.stack([unused, used], axis=-1)


def magnitude_loss(*, gray) -> jax.Array:
    """mean(gray^2): keeps the fingerprint small."""
    return jnp.mean(jnp.square(jnp.asarray(gray, jnp.float32)))


def spectrum_loss(*, lowfreq) -> jax.Array:
    """mean(lowfreq^2): pushes the fingerprint's energy out of the low frequencies."""
    return jnp.mean(jnp.square(jnp.asarray(lowfreq, jnp.float32)))


def repetitive_loss(*, highfreq_max, threshold) -> jax.Array:
    """-min(highfreq_max, threshold): rewards a strong high-frequency (repetitive) peak, capped."""
    m = jnp.asarray(highfreq_max, jnp.float32)
    if m.ndim != 0:
        raise _shape_error("highfreq_max", m.shape, "a scalar")
    return -jnp.minimum(m, threshold)


def energy_loss(*, spectrum, spectrum_transposed) -> jax.Array:
    """mean((spectrum - spectrum^T)^2): asks for a spectrum symmetric under transposition."""
    return mean_squared_error(predictions=spectrum, targets=spectrum_transposed)


# ------------------------------------------------------------------------------------------------
# The training loss of both models.


def fingerprint_constraints(fingerprints, *, loss_config=None) -> dict:
    """The four weighted constraint terms over all fingerprints.

    Args:
      fingerprints: [B, T, H, W, 3] (T = 25 for AdaParse, 1 for RE-Net), any float dtype; square
        images (the energy term compares the spectrum with its transpose).
      loss_config: see `default_loss_config`.

    Returns:
      {'magnitude', 'spectrum', 'repetitive', 'energy'}: float32 scalars, weights applied.
    """
    cfg = _check_config(loss_config)
    fp = jnp.asarray(fingerprints)
    if fp.ndim != 5 or fp.shape[-1] != 3 or fp.shape[2] != fp.shape[3]:
        raise _shape_error('outputs["fingerprints"]', fp.shape, "[B, T, H, W, 3] with H == W")
    half_size = cfg.lowfreq_half_size
    if cfg.lowfreq_window == "scaled":
        half_size = spectral.scaled_half_size(fp.shape[2], half_size)
    s = spectral.fingerprint_spectra(fp.reshape((-1,) + fp.shape[2:]), lowfreq_half_size=half_size)
    return {
        "magnitude": cfg.magnitude_weight * magnitude_loss(gray=s["gray"]),
        "spectrum": cfg.spectrum_weight * spectrum_loss(lowfreq=s["lowfreq"]),
        "repetitive": cfg.repetitive_weight * repetitive_loss(
            highfreq_max=s["highfreq_max"], threshold=cfg.repetitive_threshold),
        "energy": cfg.energy_weight * energy_loss(
            spectrum=s["spectrum"], spectrum_transposed=s["spectrum_transposed"]),
    }


def _head(outputs: Mapping, key: str, name: str, batch: int, num_classes: int):
    if key not in outputs:
        raise KeyError(f'outputs has no {key!r} (needed by the cross-entropy of {name!r})')
    if name not in outputs[key]:
        raise KeyError(f'outputs["{key}"] has no entry {name!r}')
    x = outputs[key][name]
    if tuple(x.shape) != (batch, num_classes):
        raise _shape_error(f'outputs["{key}"]["{name}"]', x.shape, f"[{batch}, {num_classes}]")
    return x


def classification_inputs(outputs: Mapping, *, ce_input: str) -> dict:
    """What each cross-entropy reads as its logits: name -> [B, K] (see the module docstring)."""
    batch = outputs["continuous"].shape[0]
    out = {}
    for t in targets.CLASSIFICATION_TARGETS:
        if ce_input == "probs":
            out[t.name] = _head(outputs, "probs", t.name, batch, t.num_classes)
        elif t.kind == targets.FLAG:
            out[t.name] = gated_flag_log_probs(
                flag_logits=_head(outputs, "logits", t.name, batch, t.num_classes),
                group_logits=_head(outputs, "logits", t.group, batch, targets.BY_NAME[t.group].num_classes))
        else:
            out[t.name] = _head(outputs, "logits", t.name, batch, t.num_classes)
    return out


def prediction_losses(outputs: Mapping, labels: Mapping, class_weights: Mapping, *,
                      loss_config=None) -> dict:
    """lambda-weighted continuous L2 and the 19 class-weighted cross-entropies.

    Args:
      outputs: model outputs (docs/ARCHITECTURE.md): 'continuous' [B, 9] and 'probs' or 'logits'
        {name: [B, K]}.
      labels: `targets.split_labels(rows)`: 'continuous' [B, 9], name -> int [B].
      class_weights: name -> [K] (`targets.class_weights`).

    Returns:
      {'continuous', <each classification target name>}: float32 scalars, lambda applied.
    """
    cfg = _check_config(loss_config)
    cont = outputs["continuous"]
    n_cont = len(targets.CONTINUOUS_TARGETS)
    if cont.ndim != 2 or cont.shape[1] != n_cont:
        raise _shape_error('outputs["continuous"]', cont.shape, f"[B, {n_cont}]")
    if tuple(labels["continuous"].shape) != tuple(cont.shape):
        raise _shape_error('labels["continuous"]', labels["continuous"].shape, f"{list(cont.shape)}")
    lam = cfg.prediction_weight
    terms = {"continuous": lam * mean_squared_error(predictions=cont, targets=labels["continuous"])}
    scores = classification_inputs(outputs, ce_input=cfg.ce_input)
    for t in targets.CLASSIFICATION_TARGETS:
        if t.name not in class_weights:
            raise KeyError(f"class_weights has no entry {t.name!r}; build it with targets.class_weights")
        terms[t.name] = lam * weighted_cross_entropy(
            logits=scores[t.name], labels=labels[t.name], class_weights=class_weights[t.name])
    return terms


def total_loss(outputs: Mapping, labels: Mapping, class_weights: Mapping, *,
               loss_config=None, step=None) -> tuple[jax.Array, dict]:
    """The training loss of RE-Net and AdaParse.

    Args:
      outputs: model outputs: 'fingerprints' [B, T, H, W, 3], 'continuous' [B, 9], and 'probs'
        (ce_input='probs') or 'logits' (ce_input='logits') {name: [B, K]}.
      labels: `targets.split_labels(label_rows)`.
      class_weights: name -> [K] from `targets.class_weights`.
      loss_config: `default_loss_config()` or an override of it; None means the default.

    Returns:
      (total, terms): terms holds magnitude, spectrum, repetitive, energy, continuous, one entry per
      `targets.CLASSIFICATION_TARGETS` name and 'total', all float32 scalars.
    """
    cfg = _check_config(loss_config)
    terms = fingerprint_constraints(outputs["fingerprints"], loss_config=cfg)
    if cfg.constraint_scale != 1 or cfg.constraint_ramp_steps:
        factor = constraint_factor(cfg.constraint_ramp_steps if step is None else step,
                                   loss_config=cfg)
        terms = {k: factor * v for k, v in terms.items()}
    if outputs["fingerprints"].shape[0] != outputs["continuous"].shape[0]:
        raise ValueError(f'outputs["fingerprints"] has batch {outputs["fingerprints"].shape[0]} but '
                         f'outputs["continuous"] has {outputs["continuous"].shape[0]}')
    terms.update(prediction_losses(outputs, labels, class_weights, loss_config=cfg))
    total = sum(terms.values())
    terms["total"] = total
    return total, terms
