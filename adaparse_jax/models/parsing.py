"""The ParsingNetwork (fingerprints -> the 25 targets) and the FEN + parser composition.

The ParsingNetwork encodes every fingerprint with 5 stages of 3x3 convolution (padding 2) + ReLU +
2x2 max-pool (3 -> 32 -> 64 -> 128 -> 256 -> 512 channels), flattens (4608 features at 64 px),
applies dropout, and three FC + ReLU layers (512, 256, 64). Its heads are generated from
`targets.HEADS` and `targets.GROUPS`:

- with T = 25 fingerprints per image (AdaParse) the head of target i reads fingerprint i's
  64-d features, and each coarse loss group reads the mean of its member flags' features;
- with T = 1 (RE-Net) every head reads the one fingerprint's features.

Outputs follow the official model: continuous targets are 9 one-output heads followed by a sigmoid;
every class of a discrete target, group or flag gets its own sigmoid; a flag's probabilities are
multiplied by its group's probability of "used" (class 1).

Flatten order: like the hypernetwork, the NHWC map is flattened as (H, W, C) and `convert.py`
permutes the rows of the official `fc1` kernel (which saw NCHW maps).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaparse_jax import spectral, targets
from adaparse_jax.models.dncnn import BatchNorm, conv3x3, dense

Dtype = Any
# Collection and name under which the parser sows its per-fingerprint features [B, T, F] (the
# heads' inputs before `head_features` picks or averages them).
INTERMEDIATES = "intermediates"
FEATURES = "features"

FEN_INPUTS = ("image", "highpass")
FINGERPRINT_SKIPS = ("none", "highpass")
PARSER_INPUT_NORMS = ("none", "rms")
PARSER_POOLS = ("flatten", "global")
PARSER_INITS = ("torch", "he")
PARSER_SPECTRA = ("none", "concat", "only")
SPECTRUM_CHANNELS = spectral.CHANNELS
SPECTRUM_INPUTS = ("fingerprint", "image")
# He-normal kernels and zero biases (`parser_init='he'`): keeps the activations' spread through
# the parser's 8 layers, where torch's default U(+-1/sqrt(fan_in)) shrinks it by ~sqrt(3) a layer.
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Floor of the per-fingerprint RMS in `parser_input_norm='rms'` (fingerprints start near 1 and
# the constraints shrink them to ~1e-2; the floor only guards an all-zero fingerprint).
RMS_FLOOR = 1e-6


def highpass(images: jax.Array) -> jax.Array:
    """x - its 3x3 box mean (edge-replicated borders), per channel: [B, H, W, C] -> same.

    A fixed residual: the content an image shares with its neighbourhood is removed, and the
    pixel-period traces of up-sampling (energy at and near the Nyquist frequency) pass unchanged.
    """
    h, w = images.shape[1:3]
    pad = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return images - blur


def rms_normalize(fingerprints: jax.Array) -> jax.Array:
    """Each fingerprint [..., H, W, C] divided by its root mean square over H, W and C."""
    x = fingerprints.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=(-3, -2, -1), keepdims=True) + RMS_FLOOR ** 2)
    return (x / rms).astype(fingerprints.dtype)


def global_pool(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, 3C]: spatial mean, standard deviation and maximum of every channel."""
    return jnp.concatenate([x.mean((1, 2)), x.std((1, 2)), x.max((1, 2))], axis=-1)


def head_features(features: jax.Array, target: targets.Target) -> jax.Array:
    """The [B, F] features a head reads from per-fingerprint features [B, T, F] (T = 25 or 1).

    A head reads its own fingerprint; a coarse group reads the mean over its member flags'
    fingerprints; with a single fingerprint every head reads it.
    """
    num = features.shape[1]
    if num not in (1, targets.NUM_HEADS):
        raise ValueError(f"the parser needs 1 or {targets.NUM_HEADS} fingerprints per image, got {num}")
    if num == 1:
        return features[:, 0]
    if target.kind == targets.GROUP:
        return jnp.mean(features[:, list(targets.group_members_indices(target))], axis=1)
    return features[:, targets.head_index(target.name)]


class ParsingNetwork(nn.Module):
    """Fingerprints [B, T, H, W, 3] -> {'continuous', 'logits', 'probs'} (see `FENParser`).

    Attributes:
      conv_features: channels of the conv-ReLU-maxpool stages (`conv1`, ...).
      fc_features: widths of the FC + ReLU layers (`fc1`, ...); the last is the heads' input.
      dropout_rate: dropout on the flattened conv features (torch `nn.Dropout()` before `fc1`).
      explicit_padding: pad with `jnp.pad` and convolve with VALID padding instead of passing
        padding=2 to the convolution: the same function (same parameters, outputs and gradients),
        but XLA:CPU computes the weight gradient of a padding-2 convolution on a slow path, 20-60x
        slower (BENCHMARKS.md, lever "parser padding").
      input_norm, pool, initializer: the learning options `parser_input_norm`, `parser_pool` and
        `parser_init` of `models.model_config`.
      spectrum: 'none' (official) | 'concat' | 'only': a spectral branch, `spectral.residual_features`
        of each fingerprint's channel mean (the log amplitude spectrum of its high-pass residual
        and its periodic position means: what the spectral probe reads from images) through a
        BatchNorm (`spectrum_bn`), concatenated with the pooled conv features before the FC layers
        ('concat') or in their place ('only': no conv stages are built).
      spectrum_channels: 'mean' | 'rgb': the spectral branch reads the fingerprint's channel mean
        (one set of features) or each of its three channels (three sets, concatenated: colour
        traces that the mean cancels).
      (The spectral branch reads the fingerprints, or what the caller passes as `spectrum_source`:
      `FENParser(spectrum_input='image')` passes the image.)
      spectrum_heads: the heads read the (normalised) spectral features too, beside the last FC
        layer's output: a linear path like the spectral probe's logistic regression, so that no
        head depends on the narrow FC layers alone (needs a spectral branch).
      conv_impl: how the conv stages are computed (`conv_ops.CONV_IMPLS`, the same function).
    """

    conv_features: tuple[int, ...] = (32, 64, 128, 256, 512)
    fc_features: tuple[int, ...] = (512, 256, 64)
    dropout_rate: float = 0.5
    explicit_padding: bool = True
    input_norm: str = "none"
    pool: str = "flatten"
    initializer: str = "torch"
    spectrum: str = "none"
    spectrum_heads: bool = False
    spectrum_channels: str = "mean"
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fingerprints: jax.Array, train: bool = False,
                 spectrum_source: jax.Array | None = None) -> dict:
        """fingerprints [B, T, S, S, 3] -> outputs; spectrum_source [B, S, S, 3] (optional): what
        the spectral branch reads instead of each fingerprint (the same features for all T)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.initializer == "he":
            kw.update(kernel_init=HE_NORMAL, bias_init=nn.initializers.zeros)
        b, t = fingerprints.shape[:2]
        x = fingerprints.reshape(b * t, *fingerprints.shape[2:]).astype(self.dtype)
        if self.input_norm == "rms":
            x = rms_normalize(x)
        if self.spectrum_heads and self.spectrum == "none":
            raise ValueError("ParsingNetwork(spectrum_heads=True) needs a spectral branch (spectrum "
                             "'concat' or 'only'; config field parser_spectrum)")
        branches = []
        if self.spectrum != "none":
            if spectrum_source is None:
                spec = spectral.channel_features(x.astype(jnp.float32), self.spectrum_channels)
            else:  # one set of features per image, shared by its T streams
                spec = spectral.channel_features(spectrum_source.astype(jnp.float32), self.spectrum_channels)
                spec = jnp.repeat(spec, t, axis=0)
            spec = BatchNorm(name="spectrum_bn", dtype=self.dtype, param_dtype=self.param_dtype)(spec, train)
            branches.append(spec.astype(self.dtype))
        if self.spectrum != "only":
            for i, f in enumerate(self.conv_features, start=1):
                if self.explicit_padding:
                    x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
                x = nn.relu(conv3x3(f, x.shape[-1], padding="VALID" if self.explicit_padding else 2,
                                    conv_impl=self.conv_impl, name=f"conv{i}", **kw)(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            branches.insert(0, global_pool(x) if self.pool == "global" else x.reshape(b * t, -1))
        x = jnp.concatenate(branches, axis=-1) if len(branches) > 1 else branches[0]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i, f in enumerate(self.fc_features, start=1):
            x = nn.relu(dense(f, x.shape[-1], name=f"fc{i}", **kw)(x))
        # The heads are tiny and feed the losses: they run in float32 whatever the compute dtype.
        features = x.reshape(b, t, -1).astype(jnp.float32)
        if self.spectrum_heads:  # a linear path from the spectral features to every head
            features = jnp.concatenate([features, spec.reshape(b, t, -1).astype(jnp.float32)], axis=-1)
        # Kept only when the caller asks (`mutable=[INTERMEDIATES]`): the plain forward, its outputs
        # and parameter names are unchanged. `visualize` reads the heads' inputs from it.
        self.sow(INTERMEDIATES, FEATURES, features)

        def head(target: targets.Target) -> jax.Array:
            return dense(target.num_classes, features.shape[-1], dtype=jnp.float32,
                         param_dtype=self.param_dtype,
                         name=f"head_{target.name}")(head_features(features, target))

        continuous = jnp.concatenate([head(tg) for tg in targets.CONTINUOUS_TARGETS], axis=-1)
        logits = {tg.name: head(tg) for tg in targets.DISCRETE_TARGETS + targets.GROUPS
                  + targets.FLAG_TARGETS}
        probs = {name: nn.sigmoid(v) for name, v in logits.items()}
        for flag in targets.FLAG_TARGETS:
            probs[flag.name] = probs[flag.name] * probs[flag.group][:, 1:2]
        return {"continuous": nn.sigmoid(continuous), "logits": logits, "probs": probs}


class FENParser(nn.Module):
    """A fingerprint estimation network followed by the ParsingNetwork.

    images [B, S, S, 3] (normalised, S = image_size) -> dict:
      fingerprints [B, T, S, S, 3] (compute dtype), continuous [B, 9],
      logits {name: [B, K]} and probs {name: [B, K]} for every discrete target, group and flag.

    Attributes:
      fen: images -> fingerprints [B, T, S, S, 3], or [B, S, S, 3] for one fingerprint per image.
      parser: the ParsingNetwork.
      image_size: the input size the model is configured for (checked).
      fen_input: 'image' (official) | 'highpass': the FEN reads `highpass(images)`, the fixed
        residual of the normalised image, instead of the image itself.
      fingerprint_skip: 'none' (official) | 'highpass': every fingerprint is the FEN's output plus
        `highpass(images)`, so the parser sees the image's residual from the first step and the
        FEN learns a correction to it (the way DnCNN itself learns a residual).
      spectrum_input: 'fingerprint' (default) | 'image': the parser's spectral branch reads each
        fingerprint, or the (normalised) image itself: the spectral probe's features, which no
        trained or randomly initialised layer changes, so they do not vary with the training
        seed; the conv stages still read the fingerprints.
    """

    fen: nn.Module
    parser: ParsingNetwork
    image_size: int = 64
    fen_input: str = "image"
    fingerprint_skip: str = "none"
    spectrum_input: str = "fingerprint"

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}; the model expects "
                             f"[B, {self.image_size}, {self.image_size}, 3] (config field image_size)")
        if self.spectrum_input not in SPECTRUM_INPUTS:
            raise ValueError(f"spectrum_input={self.spectrum_input!r}; expected one of {SPECTRUM_INPUTS}")
        residual = highpass(images) if "highpass" in (self.fen_input, self.fingerprint_skip) else None
        fingerprints = self.fen(residual if self.fen_input == "highpass" else images, train=train)
        if fingerprints.ndim == 4:  # one fingerprint per image (RE-Net)
            fingerprints = fingerprints[:, None]
        if self.fingerprint_skip == "highpass":
            fingerprints = fingerprints + residual[:, None].astype(fingerprints.dtype)
        source = images if self.spectrum_input == "image" else None
        return {"fingerprints": fingerprints, **self.parser(fingerprints, train=train, spectrum_source=source)}
