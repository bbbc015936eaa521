"""Frozen features of a trained parser, generator families, and real photographs.

Feature sets (`FEATURE_SETS`), per image:

  head      the parser's head-input features: the output of its last FC + ReLU layer for every
            fingerprint (RE-Net: 1 x 64, AdaParse: 25 x 64, concatenated): what the 25 heads read.
  spectrum  the fingerprints' pooled log amplitude spectra: log |FFT| of each gray fingerprint
            (`spectral.fingerprint_spectra`), averaged over the fingerprints of the image and over
            square blocks to a 16 x 16 grid (S x S when S < 16).
  both      head and spectrum side by side (each classifier standardises every column).
  probe     no model: the spectral features of the image itself (`zoo.probe.spectral_features`:
            log spectrum of the gray high-pass residual and its periodic means), the control that
            says what the image alone gives a linear model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

from adaparse_jax import targets
from adaparse_jax.forensics import _run

FEATURE_SETS = ("both", "head", "spectrum", "probe")
SPECTRUM_GRID = 16
BATCH_SIZE = 64


@functools.lru_cache(maxsize=4)
def _extractor(model):
    """jitted (variables, batch) -> {'head': [B, T * F], 'spectrum': [B, P * P]} (one per model
    config: the three commands in one process compile it once)."""
    import jax
    import jax.numpy as jnp

    from adaparse_jax import spectral
    from adaparse_jax.data import pipeline
    from adaparse_jax.models import parsing

    def extract(variables, batch):
        images = batch["image"]
        b, s = images.shape[0], images.shape[1]
        outputs, state = model.apply(variables, pipeline.normalize(images), train=False,
                                     mutable=[parsing.INTERMEDIATES])
        # The parser's sown features: the heads' inputs, after the last FC layer's ReLU [B, T, F].
        (features,) = state[parsing.INTERMEDIATES]["parser"][parsing.FEATURES]
        head = features.astype(jnp.float32).reshape(b, -1)
        fp = outputs["fingerprints"]  # [B, T, S, S, 3]
        spec = spectral.fingerprint_spectra(fp.reshape((-1,) + fp.shape[2:]))["spectrum"]
        logspec = jnp.log(spec).reshape(b, fp.shape[1], s, s).mean(axis=1)
        p = min(SPECTRUM_GRID, s)
        pooled = logspec[:, : s // p * p, : s // p * p].reshape(b, p, s // p, p, s // p).mean(axis=(2, 4))
        return {"head": head, "spectrum": pooled.reshape(b, -1)}

    return jax.jit(extract)


class Features:
    """Feature extraction of one run: `features(images)` -> float32 [N, D] for its feature set."""

    def __init__(self, run: _run.Run, feature_set: str = "both", batch_size: int = BATCH_SIZE):
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"--features {feature_set!r}: expected one of {', '.join(FEATURE_SETS)}")
        self.run, self.feature_set, self.batch_size = run, feature_set, batch_size
        self._fn = None if feature_set == "probe" else _extractor(run.model)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        if self.feature_set == "probe":
            from adaparse_jax.zoo import probe

            return probe.spectral_features(images).astype(np.float32)
        out = _run.predict_arrays(self._fn, self.run.variables, images, self.batch_size)
        keys = ("head", "spectrum") if self.feature_set == "both" else (self.feature_set,)
        return np.concatenate([out[k] for k in keys], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Generator families.

RECONSTRUCTION_FLAGS = ("l1", "l2", "mse")
FAMILIES = ("GAN", "autoencoder", "GAN + reconstruction", "other")


def family_of(label_row: np.ndarray) -> str:
    """A generator's family from its loss flags (one rule for RE-116 and the zoo): an adversarial
    loss and no reconstruction loss (L1, L2, MSE) -> GAN; reconstruction without adversarial ->
    autoencoder (VAEs and WAEs included); both -> GAN + reconstruction (pix2pix, VAE-GAN); neither
    -> other (e.g. MMD networks)."""
    row = np.asarray(label_row)
    adversarial = row[targets.column_index("adversarial")] > 0
    reconstruction = any(row[targets.column_index(f)] > 0 for f in RECONSTRUCTION_FLAGS)
    return FAMILIES[0 if adversarial and not reconstruction else 1 if reconstruction and not adversarial
                    else 2 if adversarial else 3]


def generator_info(run: _run.Run, names: Sequence[str]) -> dict[str, dict]:
    """name -> {'row', 'family', and 'recipe' where the dataset is a zoo with a manifest}."""
    dataset = run.data.dataset
    labels = _run.labels_of(run)
    manifest = _run.zoo_manifest(run)
    recipes = {g["name"]: g["recipe"] for g in manifest.get("generators", [])} if manifest else {}
    out = {}
    for n in names:
        row = dataset.row(n)
        out[n] = {"row": int(row), "family": family_of(labels[row])}
        if n in recipes:
            out[n]["recipe"] = recipes[n]
    return out


# ------------------------------------------------------------------------------------------------
# Real images.


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR), np.uint8)
                     for im in images])


def photograph_crops(num_fit: int, num_test: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Real images from the bundled photographs' held-out (sampling) region: (fit crops, test crops,
    info). The photographs are split in two (alternately in sorted order), so no test crop comes
    from a photograph the detector was fitted on. Crops are 32 x 32 (`zoo.photos`), resized to
    `size` like the zoo's images (PIL bilinear)."""
    from adaparse_jax.zoo import photos

    names = sorted(photos.PHOTOGRAPHS)
    fit_photos, test_photos = set(names[0::2]), set(names[1::2])
    draw = 4 * (num_fit + num_test) + 64  # each half is drawn about half of the time
    positions = photos.crop_positions(draw, "sample", seed)
    pool = photos.crop_pool(draw, "sample", seed)
    fit = [i for i, p in enumerate(positions) if p[0] in fit_photos][:num_fit]
    test = [i for i, p in enumerate(positions) if p[0] in test_photos][:num_test]
    if len(fit) < num_fit or len(test) < num_test:
        raise RuntimeError(f"drew too few photograph crops ({len(fit)}/{num_fit}, {len(test)}/{num_test})")
    info = {"source": "bundled photographs (adaparse_jax.zoo.photos), sampling region",
            "fit_photographs": sorted(fit_photos), "test_photographs": sorted(test_photos)}
    return _resize(pool[fit], size), _resize(pool[test], size), info


def folder_images(folder, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Real images from a user folder (decoded like training images): (fit, test, info), the files in
    sorted order split alternately."""
    import tempfile
    from pathlib import Path

    from adaparse_jax.data import cache as cache_lib

    with tempfile.TemporaryDirectory() as tmp:
        manifest = cache_lib.prepare_folder(folder, Path(tmp) / "cache",
                                            settings=cache_lib.PrepareSettings(size=size),
                                            workers=1, progress=False)
        cache = cache_lib.Cache(Path(tmp) / "cache")
        order = np.argsort(np.asarray(cache.paths))
        pixels = cache.read(order)
    if len(pixels) < 2:
        raise ValueError(f"--real {folder}: need at least 2 decodable images, found {len(pixels)}")
    info = {"source": f"folder {folder}", "skipped": len(manifest["skipped"])}
    return pixels[0::2], pixels[1::2], info


def family_groups(info: Mapping[str, Mapping], generators: np.ndarray,
                  names_by_row: Sequence[str]) -> dict[str, np.ndarray]:
    """family -> boolean mask over images (by their generators' rows), families in `FAMILIES` order."""
    fam = np.asarray([info[names_by_row[g]]["family"] for g in generators])
    return {f: fam == f for f in FAMILIES if np.any(fam == f)}
