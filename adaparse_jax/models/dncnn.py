"""DnCNN building blocks and RE-Net's fingerprint estimation network (DnCNN-17).

A DnCNN of depth D is a stem convolution (3x3, ReLU, no BatchNorm), D - 2 blocks of 3x3
convolution + BatchNorm + ReLU, and a final 3x3 convolution to 3 channels, all with padding 1 so
the fingerprint keeps the image's size. RE-Net uses the whole stack as its FEN; AdaParse cuts the
same stack into three runs (`DnCNN` with `first_block` / `num_blocks`) around its hypernetwork.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaparse_jax.models import conv_ops

Dtype = Any

# torch's initialisers, so that training from scratch starts where the official code starts: the
# official FENs (and the hypernetwork's convolutions) re-initialise conv kernels with
# kaiming_normal_; every other weight and every bias keeps torch's default, U(+-1/sqrt(fan_in)).
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# Initialisations of a FEN's final convolution (`DnCNN.final_init`, config field fen_final_init).
FINAL_INITS = ("kaiming", "zero")


def torch_bias_init(fan_in: int):
    """torch's default bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv3x3(features: int, in_features: int, *, padding: int | str = 1, kaiming: bool = False,
            conv_impl: str = "xla", **kw) -> nn.Conv:
    """3x3 convolution with bias and torch's initialisation (`kaiming`: kaiming_normal_ kernel;
    `kernel_init` / `bias_init` in `kw` replace them).

    `conv_impl` says how it is computed (`conv_ops.CONV_IMPLS`; the same function either way).
    """
    kw = dict(kernel_init=KAIMING_NORMAL if kaiming else TORCH_DEFAULT_KERNEL,
              bias_init=torch_bias_init(9 * in_features)) | kw
    return nn.Conv(features, (3, 3), padding=padding,
                   conv_general_dilated=conv_ops.conv_function(conv_impl), **kw)


def dense(features: int, in_features: int, **kw) -> nn.Dense:
    """Linear layer with torch's default initialisation (`kernel_init` / `bias_init` in `kw`
    replace it)."""
    kw = dict(kernel_init=TORCH_DEFAULT_KERNEL, bias_init=torch_bias_init(in_features)) | kw
    return nn.Dense(features, **kw)


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with torch's training semantics.

    Training mode normalises with the biased batch variance and, like torch, updates the running
    variance with the unbiased one (n / (n - 1)); flax's own BatchNorm stores the biased variance,
    which matters for the hypernetwork's BatchNorm1d layers that see only B rows. Statistics and
    the affine transform are computed in float32 (at least) whatever the compute dtype.

    Attributes:
      momentum: weight of the old running statistic (flax convention: torch's momentum 0.1 is 0.9).
      epsilon: added to the variance (torch's 1e-5).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[..., C] -> [..., C]; batch statistics over all leading axes when `train`."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
        x32 = x.astype(stat_dtype)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        mul = scale.astype(stat_dtype) * jax.lax.rsqrt(var + self.epsilon)
        return ((x32 - mean) * mul + bias.astype(stat_dtype)).astype(self.dtype)


class ConvBNReLU(nn.Module):
    """One DnCNN block: 3x3 convolution (padding 1, bias), BatchNorm, ReLU. [B, H, W, C] -> [B, H, W, F]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv3x3(self.features, x.shape[-1], kaiming=True, dtype=self.dtype,
                    param_dtype=self.param_dtype, conv_impl=self.conv_impl, name="conv")(x)
        x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train)
        return nn.relu(x)


class DnCNN(nn.Module):
    """A run of consecutive DnCNN layers. [B, H, W, C_in] -> [B, H, W, width or out_channels].

    Attributes:
      width: channels of every block.
      num_blocks: conv-BN-ReLU blocks in this run (may be 0).
      first_block: global index of the first block, so parameter names (`block6`, ...) say where
        in the full DnCNN a block sits whichever run holds it.
      stem: start with the DnCNN's first convolution (3x3 + ReLU, no BatchNorm), named `stem`.
      out_channels: end with the final 3x3 convolution to this many channels (no BN, no ReLU),
        named `final`; None for a run that does not end the network.
      final_init: 'kaiming' (official: kaiming_normal_ kernel, torch's default bias) | 'zero'
        (kernel and bias 0: the network's output is 0 at initialisation whatever the seed).
      conv_impl: how the convolutions are computed (`conv_ops.CONV_IMPLS`).
    """

    width: int = 64
    num_blocks: int = 15
    first_block: int = 1
    stem: bool = False
    out_channels: int | None = None
    final_init: str = "kaiming"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        kw = dict(kaiming=True, dtype=self.dtype, param_dtype=self.param_dtype,
                  conv_impl=self.conv_impl)
        if self.stem:
            x = nn.relu(conv3x3(self.width, x.shape[-1], name="stem", **kw)(x))
        for i in range(self.first_block, self.first_block + self.num_blocks):
            x = ConvBNReLU(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                           conv_impl=self.conv_impl, name=f"block{i}")(x, train)
        if self.out_channels is not None:
            if self.final_init not in FINAL_INITS:
                raise ValueError(f"DnCNN(final_init={self.final_init!r}); expected one of {FINAL_INITS}")
            if self.final_init == "zero":
                kw.update(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
            x = conv3x3(self.out_channels, x.shape[-1], name="final", **kw)(x)
        return x


def dncnn_fen(width: int = 64, depth: int = 17, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, name: str | None = None,
              conv_impl: str = "xla", final_init: str = "kaiming") -> DnCNN:
    """RE-Net's FEN: the whole DnCNN of `depth` convolutions, images -> one fingerprint [B, H, W, 3]."""
    return DnCNN(width=width, num_blocks=depth - 2, first_block=1, stem=True, out_channels=3,
                 final_init=final_init, dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl,
                 name=name)
