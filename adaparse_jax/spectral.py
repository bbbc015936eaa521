"""Fourier spectra of fingerprints, as the official fingerprint constraints read them.

The four fingerprint constraints of RE-Net and AdaParse (see `losses`) look at the gray-level
fingerprint, the magnitude of its 2-D Fourier transform, a low-frequency window around the centre of
the shifted spectrum and the largest magnitude outside that window. This module computes all of them
in one place, always in float32: FFTs in bf16 lose the dynamic range the spectrum terms (values in
the hundreds next to a 1e-2 floor) depend on.

Conventions, reproduced from the official code so that the loss terms match it exactly:

* gray = 0.299 R + 0.587 G + 0.114 B;
* the spectrum is shifted by rolling each spatial axis *left* by `size // 2` (the official
  `fftshift`). For even sizes this is `numpy.fft.fftshift`; for odd sizes it is `ifftshift`;
* magnitudes are floored at 1e-2 (sqrt of a 1e-4 floor on the squared magnitude) so the square root
  stays differentiable at zero;
* the low-frequency window is rows `H//2 - n : H//2 + n + 1` and columns `W//2 - n : W//2 + n + 1`,
  with n = 25 at 64 px: the 51 x 51 block `[7:58, 7:58]`, about 80% of each axis. The official code
  fixes n = 25 for 64 px inputs; on smaller images (the 16-32 px test sizes) that window does not
  fit, so n is clamped to the largest window that does, `min(n, (H - 1) // 2, (W - 1) // 2)` (see
  `clamped_half_size`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Floor on |F|^2 before the square root (official value); the spectrum is never below 1e-2.
POWER_FLOOR = 1e-4
DEFAULT_LOWFREQ_HALF_SIZE = 25


def clamped_half_size(height: int, width: int, requested: int = DEFAULT_LOWFREQ_HALF_SIZE) -> int:
    """Half-size n of the low-frequency window actually used for an image of this size.

    The window `[H//2 - n, H//2 + n]` must lie inside the image on both axes, which holds for
    n <= (H - 1) // 2 (and the same for W). Larger requests are clamped to that bound: at 64 px the
    official n = 25 is kept; at 32 px it becomes 15 (31 x 31 of 32 x 32) and at 16 px 7.
    """
    if requested < 0:
        raise ValueError(f"lowfreq_half_size must be >= 0, got {requested}")
    if height < 1 or width < 1:
        raise ValueError(f"fingerprints must have positive height and width, got {height}x{width}")
    return int(min(requested, (height - 1) // 2, (width - 1) // 2))


def scaled_half_size(size: int, requested: int = DEFAULT_LOWFREQ_HALF_SIZE,
                     reference: int = 64) -> int:
    """The window half-size at the official ratio: n * size / 64, rounded down (12 at 32 px).

    The official n = 25 is set for 64 px inputs (a 51 x 51 window, 51/64 of each side); clamping it
    at 32 px (`clamped_half_size`: 15) makes the window cover 31 x 31 of 32 x 32 bins, so the
    high-frequency maximum sees only the Nyquist row and column. Scaling keeps the official ratio.
    """
    if size < 1:
        raise ValueError(f"fingerprints must have a positive size, got {size}")
    return clamped_half_size(size, size, requested * size // reference)


def lowfreq_slices(height: int, width: int, half_size: int) -> tuple[slice, slice]:
    """Row and column slices of the low-frequency window (half size already clamped)."""
    ch, cw = height // 2, width // 2
    return slice(ch - half_size, ch + half_size + 1), slice(cw - half_size, cw + half_size + 1)


def _official_fftshift(x: jnp.ndarray) -> jnp.ndarray:
    """Roll the last two axes left by size // 2 (the official shift; see the module docstring)."""
    h, w = x.shape[-2:]
    return jnp.roll(x, shift=(-(h // 2), -(w // 2)), axis=(-2, -1))


def to_gray(fingerprints) -> jnp.ndarray:
    """[..., H, W, 3] RGB -> [..., H, W] gray, float32."""
    x = jnp.asarray(fingerprints, jnp.float32)
    if x.shape[-1] != 3:
        raise ValueError(f"fingerprints must have 3 channels in the last axis, got shape {x.shape}")
    r, g, b = GRAY_WEIGHTS
    return r * x[..., 0] + g * x[..., 1] + b * x[..., 2]


def fingerprint_spectra(fingerprints, *,
                        lowfreq_half_size: int = DEFAULT_LOWFREQ_HALF_SIZE) -> dict:
    """Gray image, FFT, shifted magnitude spectrum and its windows, in float32.

    Args:
      fingerprints: [N, H, W, 3] fingerprints, any float dtype (cast to float32 here).
      lowfreq_half_size: requested half-size n of the low-frequency window (official: 25);
        clamped to `clamped_half_size(H, W, n)` for images too small to hold it.

    Returns:
      dict with
        'gray' [N, H, W]: 0.299 R + 0.587 G + 0.114 B;
        'fft' complex64 [N, H, W]: un-normalised 2-D FFT of gray (not shifted);
        'spectrum' [N, H, W]: sqrt(max(|F|^2, 1e-4)), shifted;
        'spectrum_transposed' [N, W, H]: spectrum with H and W swapped;
        'lowfreq' [N, 2n + 1, 2n + 1]: the centre window of the spectrum;
        'highfreq_max' []: max over the whole batch of the spectrum with the window set to zero.
    """
    x = jnp.asarray(fingerprints)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"fingerprints must be [N, H, W, 3], got shape {x.shape}")
    _, height, width, _ = x.shape
    n = clamped_half_size(height, width, lowfreq_half_size)
    rows, cols = lowfreq_slices(height, width, n)

    gray = to_gray(x)
    fft = jnp.fft.fft2(gray.astype(jnp.complex64), axes=(-2, -1))
    power = jnp.real(fft) ** 2 + jnp.imag(fft) ** 2
    spectrum = _official_fftshift(jnp.sqrt(jnp.maximum(power, POWER_FLOOR)))

    # Zeroing the window (rather than masking it out) is what the official max sees: a window that
    # covers the whole image gives a maximum of 0.
    outside = np.ones((height, width), bool)
    outside[rows, cols] = False
    highfreq_max = jnp.max(jnp.where(outside, spectrum, 0.0))
    return {
        "gray": gray,
        "fft": fft,
        "spectrum": spectrum,
        "spectrum_transposed": jnp.swapaxes(spectrum, -1, -2),
        "lowfreq": spectrum[:, rows, cols],
        "highfreq_max": highfreq_max,
    }


# Floor inside the log of `residual_features`' amplitudes (the probe's value).
RESIDUAL_LOG_FLOOR = 1e-4


def num_residual_features(size: int) -> int:
    """Length of `residual_features` for S x S inputs: (S/2 + 1)^2 + 2^2 + 4^2."""
    return (size // 2 + 1) ** 2 + 4 + 16


def residual_features(gray, xp=jnp):
    """[N, S, S] gray images (S divisible by 4) -> [N, F] float32: the log amplitude spectrum of the
    high-pass residual (the image minus its 3x3 mean, reflected borders; the non-redundant quarter
    of the plane) and the mean absolute residual at each position modulo 2 and 4, where
    up-sampling leaves periodic traces. `num_residual_features(S)` features.

    The spectral probe's features (`zoo.probe`, with xp=numpy) and the parser's spectral branch
    (`ParsingNetwork(spectrum=...)`, with jax.numpy, differentiable: the amplitude is
    sqrt(re^2 + im^2 + tiny), which has a gradient at zero where |z| has none).
    """
    n, size = gray.shape[0], gray.shape[1]
    if gray.ndim != 3 or gray.shape[2] != size or size % 4:
        raise ValueError(f"expected [N, S, S] gray images with S divisible by 4, got {gray.shape}")
    gray = gray.astype(xp.float32)
    pad = xp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    residual = gray - sum(pad[:, i: i + size, j: j + size] for i in range(3) for j in range(3)) / 9.0
    half = size // 2 + 1
    f = xp.fft.fft2(residual)[:, :half, :half]
    amplitude = xp.sqrt(xp.square(f.real) + xp.square(f.imag) + 1e-20)
    spectrum = xp.log(amplitude + RESIDUAL_LOG_FLOOR).reshape(n, -1)
    periodic = [xp.abs(residual.reshape(n, size // p, p, size // p, p).mean((1, 3))).reshape(n, -1)
                for p in (2, 4)]
    return xp.concatenate([spectrum, *periodic], axis=1).astype(xp.float32)


CHANNELS = ("mean", "rgb")


def channel_features(pixels, channels: str = "mean", xp=jnp):
    """[N, S, S, 3] -> `residual_features` of the channel mean ([N, F]: 'mean') or of each colour
    channel, concatenated in R, G, B order ([N, 3F]: 'rgb', which sees traces the mean cancels).
    The spectral probe's features (xp=numpy) and the parser's spectral branch (jax.numpy)."""
    if channels not in CHANNELS:
        raise ValueError(f"channels={channels!r}; expected one of {CHANNELS}")
    if channels == "mean":
        return residual_features(pixels.mean(-1), xp=xp)
    n, size = pixels.shape[0], pixels.shape[1]
    planes = xp.moveaxis(pixels, -1, 1).reshape(n * 3, size, size)  # [N, 3, S, S] -> [3N, S, S]
    return residual_features(planes, xp=xp).reshape(n, -1)
