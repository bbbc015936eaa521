"""Perturbations of decoded images, for robustness tables (AdaParse Table XI) and attacks.

    from adaparse_jax import perturb
    p = perturb.parse_spec("jpeg:75")                 # NAME[:LEVEL[:...]]
    out = p(images)                                   # uint8 [B, S, S, 3] -> uint8 [B, S, S, 3]
    out = perturb.parse_spec("fgsm:4")(images, attack=attack, label_rows=rows)

Every perturbation maps decoded uint8 images [B, S, S, 3] (what the cache holds, before
normalisation) to uint8 images of the same shape: the result is what a saved 8-bit image would be,
so additive changes are rounded to whole grey levels and clipped to [0, 255].

| spec | what it does |
|---|---|
| rot90, rot180, rot270 | rotation counter-clockwise (`np.rot90` on the image axes) |
| hflip, vflip | mirror left-right / top-bottom |
| jpeg:Q | JPEG at quality Q (1-100) with PIL, encoded and decoded in memory |
| noise:SIGMA | + Gaussian noise of standard deviation SIGMA grey levels (seeded) |
| blur:SIGMA | Gaussian blur of standard deviation SIGMA pixels (`scipy.ndimage.gaussian_filter`) |
| resize:F | down to round(F S) pixels, then back up to S (PIL bilinear, antialiased), 0 < F <= 1 |
| crop:F | the centre round(F S) square, resized back to S (PIL bilinear), 0 < F <= 1 |
| fgsm:EPS | one signed-gradient step of EPS grey levels that raises the parsing loss |
| pgd:EPS[:STEPS] | STEPS (default 10) signed steps of 2.5 EPS / STEPS, projected to the EPS ball |
| denoise:WEIGHT | total-variation denoising (`skimage.restoration.denoise_tv_chambolle`, weight on [0, 1] images) |

FGSM and PGD attack the model's own parsing loss of the true labels: the sum of the lambda-weighted
prediction losses of `losses.prediction_losses` (continuous L2 and the 19 class-weighted
cross-entropies, the run's loss config), differentiated with `jax.grad` with respect to the input
in grey levels (0..255), through the normalisation, with the model in evaluation mode. PGD starts
at the clean image (no random start), so both attacks are deterministic. Rounding to uint8 happens
once, at the end: an EPS below 0.5 grey levels is rounded away.

The reconstruction attack (AdaParse passes images through a DnCNN denoiser, which removes the high
frequencies that carry generator traces) is a classical denoiser here: total-variation denoising
(Chambolle). A DnCNN trained as a denoiser on the bundled photographs would need minutes of
training per run on the project's 2-core CPU, shared by everything else; the TV denoiser removes
the same kind of content (fine, periodic, low-amplitude patterns) with no training and no cache.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from adaparse_jax import losses, targets


class PerturbationError(ValueError):
    """A perturbation spec that cannot be parsed, or a perturbation called without what it needs."""


# ------------------------------------------------------------------------------------------------
# Gradient attacks: what they need from the model.


@dataclasses.dataclass(frozen=True)
class Attack:
    """What FGSM and PGD need from a trained model.

    Attributes:
      apply: pure `apply(variables, images) -> outputs`: images [B, S, S, 3] in grey levels (uint8
        or float, 0..255), normalised inside, evaluation mode (BatchNorm running statistics, no
        dropout); outputs as docs/ARCHITECTURE.md ('continuous', 'probs', 'logits').
      variables: the model's variables ({'params', 'batch_stats'}).
      class_weights: name -> [K] class weights of the cross-entropies (`targets.class_weights`).
      loss_config: the run's loss config (`losses.default_loss_config()` when None).
      batch_size: images per gradient call.
    """

    apply: Callable
    variables: Any
    class_weights: Mapping
    loss_config: Any = None
    batch_size: int = 64

    def loss(self, variables, pixels, label_rows):
        """The parsing loss (scalar) of float images [B, S, S, 3] in grey levels against label rows [B, 28]."""
        outputs = self.apply(variables, pixels)
        terms = losses.prediction_losses(outputs, targets.split_labels(label_rows), self.class_weights,
                                         loss_config=self.loss_config)
        return sum(terms.values())

    @functools.cached_property
    def _loss_and_grad(self):
        import jax

        return jax.jit(jax.value_and_grad(self.loss, argnums=1))

    def loss_and_grad(self, pixels: np.ndarray, label_rows: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, d loss / d pixels) of one batch, on the host (float32 pixels in grey levels)."""
        import jax.numpy as jnp

        value, grad = self._loss_and_grad(self.variables, jnp.asarray(pixels, jnp.float32),
                                          jnp.asarray(label_rows, jnp.float32))
        return float(value), np.asarray(grad)


def _gradient_sign_attack(images: np.ndarray, attack: Attack | None, label_rows, eps: float,
                          steps: int, step_size: float, name: str) -> np.ndarray:
    if attack is None or label_rows is None:
        raise PerturbationError(f"perturbation {name!r} attacks the model: pass attack= and label_rows=")
    label_rows = np.asarray(label_rows, np.float32)
    if label_rows.shape != (len(images), targets.NUM_LABEL_COLUMNS):
        raise PerturbationError(f"perturbation {name!r}: label_rows has shape {label_rows.shape}; "
                                f"expected [{len(images)}, {targets.NUM_LABEL_COLUMNS}]")
    out = np.empty_like(images)
    size = attack.batch_size
    for start in range(0, len(images), size):
        n = len(images[start:start + size])
        # A short last batch is padded with copies of its last image (one compiled shape); in
        # evaluation mode images do not interact, so the padding leaves the others' gradients' signs.
        pad = ((0, size - n),) + ((0, 0),) * 3
        clean = np.pad(images[start:start + size].astype(np.float32), pad, mode="edge")
        rows = np.pad(label_rows[start:start + size], pad[:2], mode="edge")
        x = clean.copy()
        for _ in range(steps):
            _, grad = attack.loss_and_grad(x, rows)
            x = np.clip(x + step_size * np.sign(grad), clean - eps, clean + eps)
            x = np.clip(x, 0.0, 255.0)
        out[start:start + n] = np.round(x[:n]).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# The perturbations: uint8 [B, S, S, 3] -> uint8 [B, S, S, 3].


def _per_image_pil(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im)).convert("RGB"), np.uint8) for im in images])


def rotate(images: np.ndarray, quarter_turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(images, quarter_turns, axes=(1, 2)))


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    def once(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf)

    return _per_image_pil(images, once)


def gaussian_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="reflect")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize(images: np.ndarray, factor: float) -> np.ndarray:
    size = images.shape[1]
    small = max(1, int(round(size * factor)))
    return _per_image_pil(images, lambda im: im.resize((small, small), Image.BILINEAR)
                          .resize((size, size), Image.BILINEAR))


def center_crop(images: np.ndarray, fraction: float) -> np.ndarray:
    size = images.shape[1]
    side = max(1, int(round(size * fraction)))
    top = (size - side) // 2
    return _per_image_pil(images, lambda im: im.crop((top, top, top + side, top + side))
                          .resize((size, size), Image.BILINEAR))


def denoise_tv(images: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    out = np.stack([denoise_tv_chambolle(im.astype(np.float64) / 255.0, weight=weight, channel_axis=-1)
                    for im in images])
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Specs.


@dataclasses.dataclass(frozen=True)
class _Kind:
    """A perturbation family: its levels (name, type, check, default) and its function."""

    levels: tuple[tuple[str, type, Callable[[float], bool], str, Any], ...]
    fn: Callable  # (images, *levels, seed, attack, label_rows) -> images
    uses_model: bool = False


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 < v <= 1


KINDS: dict[str, _Kind] = {
    "rot90": _Kind((), lambda x, **_: rotate(x, 1)),
    "rot180": _Kind((), lambda x, **_: rotate(x, 2)),
    "rot270": _Kind((), lambda x, **_: rotate(x, 3)),
    "hflip": _Kind((), lambda x, **_: np.ascontiguousarray(x[:, :, ::-1])),
    "vflip": _Kind((), lambda x, **_: np.ascontiguousarray(x[:, ::-1])),
    "jpeg": _Kind((("QUALITY", int, lambda q: 1 <= q <= 100, "an integer 1-100", None),),
                  lambda x, q, **_: jpeg(x, q)),
    "noise": _Kind((("SIGMA", float, _non_negative, "grey levels >= 0", None),),
                   lambda x, s, seed=0, **_: gaussian_noise(x, s, seed)),
    "blur": _Kind((("SIGMA", float, _non_negative, "pixels >= 0", None),), lambda x, s, **_: blur(x, s)),
    "resize": _Kind((("FACTOR", float, _fraction, "in (0, 1]", None),), lambda x, f, **_: resize(x, f)),
    "crop": _Kind((("FRACTION", float, _fraction, "in (0, 1]", None),),
                  lambda x, f, **_: center_crop(x, f)),
    "fgsm": _Kind((("EPS", float, _non_negative, "grey levels >= 0", None),),
                  lambda x, eps, attack=None, label_rows=None, **_: _gradient_sign_attack(
                      x, attack, label_rows, eps, 1, eps, "fgsm"), uses_model=True),
    "pgd": _Kind((("EPS", float, _non_negative, "grey levels >= 0", None),
                  ("STEPS", int, _positive, "an integer >= 1", 10)),
                 lambda x, eps, steps, attack=None, label_rows=None, **_: _gradient_sign_attack(
                     x, attack, label_rows, eps, steps, 2.5 * eps / steps, "pgd"), uses_model=True),
    "denoise": _Kind((("WEIGHT", float, _positive, "> 0 (TV weight on [0, 1] images)", None),),
                     lambda x, w, **_: denoise_tv(x, w)),
}


def _usage(name: str) -> str:
    parts = [name]
    for level, _, _, _, default in KINDS[name].levels:
        parts.append(f"[:{level}]" if default is not None else f":{level}")
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A parsed spec: `perturbation(images, seed=0, attack=None, label_rows=None)` -> images."""

    spec: str
    name: str
    levels: tuple

    @property
    def uses_model(self) -> bool:
        return KINDS[self.name].uses_model

    def __call__(self, images, *, seed: int = 0, attack: Attack | None = None,
                 label_rows=None) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
                or images.shape[1] != images.shape[2]:
            raise PerturbationError(f"perturbation {self.spec!r} takes uint8 [B, S, S, 3] images, got "
                                    f"{images.dtype} {images.shape}")
        out = KINDS[self.name].fn(images, *self.levels, seed=seed, attack=attack, label_rows=label_rows)
        assert out.shape == images.shape and out.dtype == np.uint8, (self.spec, out.shape, out.dtype)
        return out


def parse_spec(spec: str) -> Perturbation:
    """'NAME[:LEVEL[:...]]' -> a Perturbation; PerturbationError naming the spec when it is bad."""
    text = str(spec).strip()
    name, *raw = text.split(":")
    name = name.strip().lower()
    if name not in KINDS:
        raise PerturbationError(f"perturbation {spec!r}: unknown name {name!r}; expected one of "
                                + ", ".join(_usage(n) for n in KINDS))
    kind = KINDS[name]
    required = sum(1 for lv in kind.levels if lv[4] is None)
    if not required <= len(raw) <= len(kind.levels):
        raise PerturbationError(f"perturbation {spec!r}: {name} takes {_usage(name)}, got {len(raw)} "
                                f"level(s)")
    levels = []
    for i, (level, typ, ok, what, default) in enumerate(kind.levels):
        if i >= len(raw):
            levels.append(default)
            continue
        try:
            value = typ(raw[i])
        except ValueError:
            raise PerturbationError(f"perturbation {spec!r}: {level} must be {what}, got {raw[i]!r}") from None
        if not np.isfinite(value) or not ok(value):
            raise PerturbationError(f"perturbation {spec!r}: {level} must be {what}, got {raw[i]!r}")
        levels.append(value)
    return Perturbation(text, name, tuple(levels))


def parse_specs(specs: Sequence[str]) -> list[Perturbation]:
    """Several specs, each checked (the first bad one raises); duplicates are refused."""
    out = [parse_spec(s) for s in specs]
    seen = [p.spec for p in out]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise PerturbationError(f"perturbation(s) given twice: {', '.join(dup)}")
    return out
