"""The zoo's generator family (flax.linen, NHWC) and the 9 architecture counts measured on it.

One `Generator` module covers every `schema.Architecture`:

  latent input  z [B, Z] -> (fc_layers - 1) x (Dense -> act) -> Dense -> [B, s, s, C] -> norm -> act
  encoder       x [B, 32, 32, 3] -> stem conv -> stages x (down-sample -> norm -> act -> Block)
                -> optional FC bottleneck -> optional variational bottleneck (VAE recipes)
  then          mid_blocks x Block -> stages x (up-sample -> norm -> act -> Block) -> conv -> last act

A Block is `layers_per_block` x (3x3 conv -> norm -> act); with skip connections the last activation
is applied after adding the block's input (a residual block). Up-sampling is a 4x4 stride-2
transposed conv or a x2 resize (nearest or bilinear) followed by a 3x3 conv; down-sampling a 4x4
stride-2 conv or a 3x3 conv followed by 2x2 average pooling.

Output range: the last non-linearity fixes the range the generator works in (`DATA_RANGES`): it is
trained on real crops scaled to that range, and its outputs are mapped from that range to [0, 255]
(`to_uint8`), so every generator fills the same pixel range and the range alone does not reveal the
last layer (its shape near the bounds still does: saturation, clipping, dead ReLUs).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adaparse_jax import targets
from adaparse_jax.zoo.schema import IMAGE_SIZE, Architecture

FC_HIDDEN = 128  # width of the hidden dense layers (latent mapping, encoder FC bottleneck)
LEAKY_SLOPE = 0.2

BLOCK_ACTIVATIONS: Mapping[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "leaky_relu": lambda x: nn.leaky_relu(x, LEAKY_SLOPE),
    "sigmoid": nn.sigmoid,
}
LAST_ACTIVATIONS: Mapping[str, Callable] = {
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
    "relu": nn.relu,
}
# (low, high) of the data a generator is trained on and sampled from, by last non-linearity:
# the bounded ones use their own range; identity uses tanh's, relu sigmoid's (both are clipped to it
# when converted to pixels).
DATA_RANGES: Mapping[str, tuple[float, float]] = {
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "identity": (-1.0, 1.0),
    "relu": (0.0, 1.0),
}


def to_data_range(images_uint8: np.ndarray, nonlin_last: str) -> np.ndarray:
    """uint8 [..., 3] -> float32 in the generator's data range."""
    lo, hi = DATA_RANGES[nonlin_last]
    return (lo + (hi - lo) * (np.asarray(images_uint8, np.float32) / 255.0)).astype(np.float32)


def to_uint8(images: np.ndarray, nonlin_last: str) -> np.ndarray:
    """Generator outputs in its data range -> uint8 pixels (affine map, round, clip)."""
    lo, hi = DATA_RANGES[nonlin_last]
    x = (np.asarray(images, np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class Normalization(nn.Module):
    """Normalisation of conv features [B, H, W, C] by kind: batch, instance, layer or none."""

    kind: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "none":
            return x
        if self.kind == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm", **kw)(x)
        if self.kind == "instance":
            return nn.InstanceNorm(name="norm", **kw)(x)
        if self.kind == "layer":
            # Over the whole sample (H, W, C), one scale/shift per channel, as in conv LayerNorm use.
            return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1, name="norm", **kw)(x)
        raise ValueError(f"unknown normalization {self.kind!r}")


class AvgPool(nn.Module):
    """2x2 average pooling; a module so that the network's layer count can see it."""

    @nn.compact
    def __call__(self, x):
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Block(nn.Module):
    """`layers` x (3x3 conv -> norm -> act) on [B, H, W, C], channels kept; optional residual."""

    features: int
    layers: int
    normalization: str
    activation: str
    skip: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = BLOCK_ACTIVATIONS[self.activation]
        h = x
        for i in range(self.layers):
            h = nn.Conv(self.features, (3, 3), name=f"conv{i}", **kw)(h)
            h = Normalization(self.normalization, name=f"norm{i}", **kw)(h, train)
            if i < self.layers - 1 or not self.skip:
                h = act(h)
        # The residual joins before the last activation, as in ResNet/SRGAN-style generator blocks.
        return act(h + x) if self.skip else h


class Generator(nn.Module):
    """One zoo generator.

    Attributes:
      arch: the architecture.
      variational: encoders only (VAE recipes): the bottleneck is a Gaussian posterior, sampled with
        the reparameterisation trick from the "latent" rng; adds a 1x1 conv giving mean and
        log-variance.

    Call: `inputs` is z [B, Z] (latent input) or a conditioning crop [B, 32, 32, 3] in the data range
    (encoder). Returns (images [B, 32, 32, 3] in the data range, aux) where aux["code"] [B, D] is the
    latent code (z itself, or the encoder's flattened bottleneck) and aux["kl"] [] is the posterior's
    KL divergence from N(0, I), summed over code dimensions and averaged over the batch (0 when not
    variational).
    """

    arch: Architecture
    variational: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _norm_act(self, h, train, name):
        h = Normalization(self.arch.normalization, name=name, dtype=self.dtype,
                          param_dtype=self.param_dtype)(h, train)
        return BLOCK_ACTIVATIONS[self.arch.nonlin_block](h)

    def _block(self, h, train, name):
        a = self.arch
        return Block(h.shape[-1], a.layers_per_block, a.normalization, a.nonlin_block,
                     a.skip == "yes", dtype=self.dtype, param_dtype=self.param_dtype,
                     name=name)(h, train)

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        a = self.arch
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = BLOCK_ACTIVATIONS[a.nonlin_block]
        s, c = a.bottleneck_size, a.channels(a.stages)
        kl = jnp.zeros((), jnp.float32)
        if a.encoder:
            h = act(nn.Conv(a.channels(0), (3, 3), name="stem", **kw)(inputs))
            for i in range(a.stages):
                ch = a.channels(i + 1)
                if a.down_kind == "strided_conv":
                    h = nn.Conv(ch, (4, 4), strides=(2, 2), name=f"down{i}", **kw)(h)
                else:
                    h = AvgPool(name=f"pool{i}")(nn.Conv(ch, (3, 3), name=f"down{i}", **kw)(h))
                h = self._norm_act(h, train, f"down_norm{i}")
                h = self._block(h, train, f"down_block{i}")
            if a.fc_layers:
                f = h.reshape(h.shape[0], -1)
                for j in range(a.fc_layers - 1):
                    f = act(nn.Dense(FC_HIDDEN, name=f"fc{j}", **kw)(f))
                h = act(nn.Dense(s * s * c, name=f"fc{a.fc_layers - 1}", **kw)(f)).reshape(-1, s, s, c)
            if self.variational:
                stats = nn.Conv(2 * c, (1, 1), name="posterior", **kw)(h).astype(jnp.float32)
                mean, logvar = jnp.split(stats, 2, axis=-1)
                # Clipped so that a diverging step cannot overflow exp() in a 150-step training.
                logvar = jnp.clip(logvar, -8.0, 8.0)
                eps = jax.random.normal(self.make_rng("latent"), mean.shape)
                h = (mean + jnp.exp(0.5 * logvar) * eps).astype(h.dtype)
                kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
            code = h.reshape(h.shape[0], -1)
        else:
            code = inputs
            f = inputs
            for j in range(a.fc_layers - 1):
                f = act(nn.Dense(FC_HIDDEN, name=f"fc{j}", **kw)(f))
            h = nn.Dense(s * s * c, name=f"fc{a.fc_layers - 1}", **kw)(f).reshape(-1, s, s, c)
            h = self._norm_act(h, train, "input_norm")
        for m in range(a.mid_blocks):
            h = self._block(h, train, f"mid_block{m}")
        for j in range(a.stages):
            ch = a.channels(a.stages - 1 - j)
            if a.upsampling == "transposed_conv":
                h = nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", name=f"up{j}", **kw)(h)
            else:
                b, hh, ww, cc = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, cc), method=a.resize_method)
                h = nn.Conv(ch, (3, 3), name=f"up{j}", **kw)(h)
            h = self._norm_act(h, train, f"up_norm{j}")
            h = self._block(h, train, f"up_block{j}")
        out = nn.Conv(3, (3, 3), name="to_rgb", **kw)(h)
        out = LAST_ACTIVATIONS[a.nonlin_last](out.astype(jnp.float32))
        return out, {"code": code.astype(jnp.float32), "kl": kl}


def input_shape(arch: Architecture, batch: int) -> tuple[int, ...]:
    """Shape of a generator's input: [B, Z] or [B, 32, 32, 3]."""
    return (batch, IMAGE_SIZE, IMAGE_SIZE, 3) if arch.encoder else (batch, arch.latent_dim)


def variable_shapes(module: nn.Module, example_inputs: tuple, **call_kwargs) -> dict:
    """`module`'s variables as jax.ShapeDtypeStruct leaves (`jax.eval_shape` of its init)."""
    structs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in example_inputs)
    return nn.unbox(jax.eval_shape(
        lambda *xs: module.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, *xs,
                                **call_kwargs), *structs))


def init_variables(module: nn.Module, example_inputs: tuple, rng: np.random.Generator,
                   **call_kwargs) -> dict:
    """Variables of `module` from `jax.eval_shape` shapes, filled with NumPy (float32 arrays).

    Avoids compiling an init function per architecture (seconds each on a CPU). Kernels are
    LeCun-normal (std 1/sqrt(fan_in), flax's default), biases and shifts 0, norm scales 1, BatchNorm
    statistics mean 0 / var 1. Deterministic in `rng`'s state.
    """
    flat = traverse_util.flatten_dict(variable_shapes(module, example_inputs, **call_kwargs))
    out = {}
    for path in sorted(flat):  # sorted so the draw order does not depend on dict order
        sd = flat[path]
        if path[-1] == "kernel":
            # Conv [kh, kw, in, out], ConvTranspose [kh, kw, in, out], Dense [in, out].
            fan_in = int(np.prod(sd.shape[:-1]))
            value = rng.standard_normal(sd.shape) / math.sqrt(fan_in)
        elif path[-1] in ("scale", "var"):
            value = np.ones(sd.shape)
        else:
            value = np.zeros(sd.shape)
        out[path] = np.asarray(value, sd.dtype)
    return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- counts
COUNT_NAMES = tuple(t.name for t in targets.CONTINUOUS_TARGETS)
_CONV = ("Conv", "ConvTranspose")
_NORMS = ("BatchNorm", "InstanceNorm", "LayerNorm")


def architecture_counts(module: Generator, batch: int = 2) -> dict[str, int]:
    """The 9 RE-116 counts of a generator, measured on the built network.

    Traces one forward pass with `jax.eval_shape` and records every layer module called (flax
    method interception), so the counts follow the code, not the architecture fields:

      conv_layers       convolutions (incl. transposed)   fc_layers   dense layers
      norm_layers       normalisation layers              pooling_layers   pooling layers
      layers            conv + FC + normalisation + pooling (activations are not layers)
      filters           output channels summed over all convolutions
      blocks            Block modules; layers_per_block: convolutions inside blocks / blocks
      parameters        size of the "params" collection (BatchNorm statistics excluded)

    Returns name -> raw (un-normalised) count, keyed by `targets` continuous names.
    """
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            calls.append((type(context.module).__name__, context.module.path, context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = variable_shapes(module, (np.zeros(input_shape(module.arch, batch), np.float32),),
                                    train=False)
    kinds = collections.Counter(kind for kind, _, _ in calls)
    block_paths = [path for kind, path, _ in calls if kind == "Block"]
    convs = [(path, m) for kind, path, m in calls if kind in _CONV]
    conv_in_blocks = sum(1 for path, _ in convs if any(path[: len(b)] == b for b in block_paths))
    counts = {
        "conv_layers": len(convs),
        "fc_layers": kinds["Dense"],
        "norm_layers": sum(kinds[k] for k in _NORMS),
        "pooling_layers": kinds["AvgPool"],
        "filters": sum(int(m.features) for _, m in convs),
        "blocks": len(block_paths),
        "parameters": int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(variables["params"]))),
    }
    counts["layers"] = (counts["conv_layers"] + counts["fc_layers"] + counts["norm_layers"]
                        + counts["pooling_layers"])
    counts["layers_per_block"] = conv_in_blocks / len(block_paths) if block_paths else 0
    return {name: counts[name] for name in COUNT_NAMES}


def normalise_counts(raw: np.ndarray) -> tuple[np.ndarray, dict]:
    """Min-max normalise [G, 9] raw counts over the zoo, like RE-116 (parameters on a log10 scale).

    A column with one value everywhere maps to 0. Returns (normalised [G, 9] float64, the
    normalisation as a JSON-able dict: per count min/max of the (log) values and which are log10).
    """
    raw = np.asarray(raw, np.float64)
    log_cols = [COUNT_NAMES.index("parameters")]
    values = raw.copy()
    values[:, log_cols] = np.log10(values[:, log_cols])
    lo, hi = values.min(axis=0), values.max(axis=0)
    span = hi - lo
    out = np.where(span > 0, (values - lo) / np.where(span > 0, span, 1.0), 0.0)
    info = {"min": dict(zip(COUNT_NAMES, lo.tolist())), "max": dict(zip(COUNT_NAMES, hi.tolist())),
            "log10": [COUNT_NAMES[i] for i in log_cols]}
    return np.clip(out, 0.0, 1.0), info
