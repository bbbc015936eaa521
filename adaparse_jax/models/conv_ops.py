"""How a convolution is computed: XLA's convolution, or its weight gradient as matrix products.

The models' convolutions are stride-1, undilated NHWC/HWIO convolutions (3x3 kernels, padding 1 or
VALID). For those, `conv_function(impl)` returns a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)`) that computes the same function with the same parameters:

  xla           `lax.conv_general_dilated`, with the gradients autodiff derives (XLA
                convolutions for the forward pass, the input gradient and the weight gradient).
  weight_dots   forward pass and input gradient as above; the weight gradient as one matrix
                product per kernel row i, dW[i] = X_i^T dy, X_i being the kw shifted views
                x_pad[n, h+i, w+j, :] (j = 0..kw-1) side by side, [N*H'*W', kw*C] (a
                `jax.custom_vjp`). XLA:CPU computes the weight gradient of a convolution as a
                convolution whose window is the whole image, several times slower per FLOP than
                the forward pass. Measured on this project's 2-core CPU (`python -m
                benchmarks.conv_bench --arch adaparse --batch 8 --only "DnCNN block"`, weight
                gradient of a 64 -> 64 conv at 64 x 64): 8 images, XLA 37.9 GFLOP/s, per row 45.0;
                200 images (AdaParse's 25 folded streams of 8) 16.0 and 45.6 (BENCHMARKS.md,
                lever "conv weight gradient"). Convolutions with fewer than
                MIN_DOT_CHANNELS input or output channels (the DnCNN's stem and final
                convolution) keep XLA's weight gradient: a product with a 3-wide side is slower
                than it there.
  auto          'weight_dots' for a convolution whose batch holds at least MIN_DOT_BATCH images
                when the default backend is a CPU, else 'xla' (GPUs have cuDNN's
                weight-gradient kernels), decided when the model is traced. On a CPU that means
                the products where AdaParse folds its 25 personalised streams into the batch
                (the adaptive DnCNN blocks and the parser: 25 B images), XLA's weight gradient
                on RE-Net's and AdaParse's shared blocks at the batch sizes a CPU trains (the
                whole training step per setting, `python -m benchmarks.step_impl`: BENCHMARKS.md,
                lever "conv weight gradient").

Other convolutions (strides, dilation, groups, other layouts) always take `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "weight_dots")
MIN_DOT_CHANNELS = 16
MIN_DOT_BATCH = 32  # 'auto': the batch from which a CPU takes the products
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_weight_dots(x: jax.Array, w: jax.Array, padding: tuple) -> jax.Array:
    """x [N, H, W, C], w [KH, KW, C, F], padding ((top, bottom), (left, right)) -> [N, H', W', F]."""
    return _conv(x, w, padding)


def _fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _bwd(padding, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _conv(x, w, padding), x)
    (dx,) = input_vjp(dy)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    kh, kw, c, f = w.shape
    ho, wo = dy.shape[1:3]
    dy_rows = dy.reshape(-1, f)
    # One product per kernel row: its kw horizontal shifts side by side, [N*H'*W', kw*C]^T @ dy.
    rows = [jnp.concatenate([xp[:, i:i + ho, j:j + wo] for j in range(kw)], axis=-1).reshape(-1, kw * c)
            for i in range(kh)]
    dw = jnp.stack([jnp.matmul(r.T, dy_rows, preferred_element_type=jnp.float32) for r in rows])
    return dx, dw.reshape(w.shape).astype(w.dtype)


conv_weight_dots.defvjp(_fwd, _bwd)


def _explicit_padding(padding, kernel_shape) -> tuple | None:
    if isinstance(padding, str):
        return ((0, 0), (0, 0)) if padding.upper() == "VALID" else None
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return pads if len(pads) == len(kernel_shape) - 2 == 2 else None


def conv_function(impl: str):
    """A `lax.conv_general_dilated` drop-in computing the models' convolutions with `impl`."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"config field conv_impl={impl!r}; expected one of {CONV_IMPLS}")
    if impl == "xla":
        return lax.conv_general_dilated

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
             preferred_element_type=None):
        pads = _explicit_padding(padding, rhs.shape)
        plain = (tuple(window_strides) == (1, 1) and set(lhs_dilation or (1,)) == {1}
                 and set(rhs_dilation or (1,)) == {1} and feature_group_count == 1
                 and batch_group_count == 1 and precision is None and preferred_element_type is None
                 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                 == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
        dots = impl == "weight_dots" or (impl == "auto" and jax.default_backend() == "cpu"
                                         and lhs.shape[0] >= MIN_DOT_BATCH)
        if (pads is None or not plain or not dots
                or min(rhs.shape[-2:]) < MIN_DOT_CHANNELS):
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers, feature_group_count,
                                            batch_group_count, precision, preferred_element_type)
        return conv_weight_dots(lhs, rhs, pads)

    return conv
