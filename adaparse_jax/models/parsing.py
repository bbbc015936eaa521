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

from adaparse_jax import targets
from adaparse_jax.models.dncnn import conv3x3, dense

Dtype = Any
# Collection and name under which the parser sows its per-fingerprint features [B, T, F] (the
# heads' inputs before `head_features` picks or averages them).
INTERMEDIATES = "intermediates"
FEATURES = "features"


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
    """

    conv_features: tuple[int, ...] = (32, 64, 128, 256, 512)
    fc_features: tuple[int, ...] = (512, 256, 64)
    dropout_rate: float = 0.5
    explicit_padding: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fingerprints: jax.Array, train: bool = False) -> dict:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t = fingerprints.shape[:2]
        x = fingerprints.reshape(b * t, *fingerprints.shape[2:]).astype(self.dtype)
        for i, f in enumerate(self.conv_features, start=1):
            if self.explicit_padding:
                x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
            x = nn.relu(conv3x3(f, x.shape[-1], padding="VALID" if self.explicit_padding else 2,
                                name=f"conv{i}", **kw)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(b * t, -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i, f in enumerate(self.fc_features, start=1):
            x = nn.relu(dense(f, x.shape[-1], name=f"fc{i}", **kw)(x))
        # The heads are tiny and feed the losses: they run in float32 whatever the compute dtype.
        features = x.reshape(b, t, -1).astype(jnp.float32)
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
    """

    fen: nn.Module
    parser: ParsingNetwork
    image_size: int = 64

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}; the model expects "
                             f"[B, {self.image_size}, {self.image_size}, 3] (config field image_size)")
        fingerprints = self.fen(images, train=train)
        if fingerprints.ndim == 4:  # one fingerprint per image (RE-Net)
            fingerprints = fingerprints[:, None]
        return {"fingerprints": fingerprints, **self.parser(fingerprints, train=train)}
