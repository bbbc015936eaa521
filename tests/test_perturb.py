"""adaparse_jax.perturb: each perturbation changes what it should and keeps shape and dtype; the
spec parser's errors name the spec; FGSM and PGD raise the parsing loss of a tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_models import numpy_variables

from adaparse_jax import models, perturb, targets
from adaparse_jax.data import pipeline, synthetic

SIZE = 16


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(40, 215, (6, SIZE // 4, SIZE // 4, 3)), 4, 1), 4, 2)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def p(spec):
    return perturb.parse_spec(spec)


NON_MODEL_SPECS = ["rot90", "rot180", "rot270", "hflip", "vflip", "jpeg:75", "noise:4", "blur:1",
                   "resize:0.5", "crop:0.75", "denoise:0.1"]


@pytest.mark.parametrize("spec", NON_MODEL_SPECS)
def test_shape_dtype_kept_and_pixels_changed(images, spec):
    out = p(spec)(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images), spec
    assert not np.shares_memory(out, images)


def test_rotations_and_flips_are_the_numpy_ones(images):
    r = p("rot90")
    assert np.array_equal(r(r(r(r(images)))), images)
    assert np.array_equal(r(images), np.rot90(images, 1, axes=(1, 2)))
    assert np.array_equal(p("rot180")(images), r(r(images)))
    assert np.array_equal(p("rot270")(images), r(r(r(images))))
    assert np.array_equal(p("hflip")(images), images[:, :, ::-1])
    assert np.array_equal(p("vflip")(images), images[:, ::-1])
    # A rotation moves pixels only: the multiset of values per image is unchanged.
    assert np.array_equal(np.sort(r(images).reshape(6, -1)), np.sort(images.reshape(6, -1)))


def test_jpeg_changes_pixels_but_keeps_the_mean_and_quality_orders_the_error(images):
    errors = {}
    for q in (10, 50, 95):
        out = p(f"jpeg:{q}")(images)
        assert abs(out.astype(float).mean() - images.mean()) < 3.0
        errors[q] = np.abs(out.astype(float) - images).mean()
    assert errors[95] < errors[50] < errors[10]
    assert errors[95] > 0


def test_noise_has_the_requested_sigma_and_is_seeded():
    grey = np.full((8, SIZE, SIZE, 3), 128, np.uint8)
    out = p("noise:5")(grey, seed=3)
    diff = out.astype(float) - 128
    assert abs(diff.std() - 5.0) < 0.3 and abs(diff.mean()) < 0.3
    assert np.array_equal(out, p("noise:5")(grey, seed=3))
    assert not np.array_equal(out, p("noise:5")(grey, seed=4))
    assert np.array_equal(p("noise:0")(grey), grey)


def test_blur_resize_crop_denoise_remove_fine_detail_and_keep_flat_images():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    checker = np.where((yy + xx) % 2 == 0, 200, 50).astype(np.uint8)
    checker = np.repeat(checker[None, ..., None], 3, axis=-1)
    flat = np.full((1, SIZE, SIZE, 3), 77, np.uint8)
    for spec in ("blur:1", "resize:0.5", "denoise:0.3"):
        out = p(spec)(checker).astype(float)
        assert out.std() < 0.25 * checker.std(), spec  # the 1-pixel period is (mostly) gone
        assert abs(out.mean() - checker.mean()) < 6, spec
        assert np.array_equal(p(spec)(flat), flat), spec
    for spec in ("blur:0", "resize:1", "crop:1"):
        assert np.array_equal(p(spec)(checker), checker), spec
    # crop:0.5 keeps the centre: an image that is 10 inside the centre half and 240 outside -> all 10.
    framed = np.full((1, SIZE, SIZE, 3), 240, np.uint8)
    framed[:, SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 10
    assert np.array_equal(p("crop:0.5")(framed), np.full_like(framed, 10))


def test_denoise_brings_a_noisy_image_closer_to_the_clean_one():
    rng = np.random.default_rng(5)
    blocks = np.repeat(np.repeat(rng.integers(40, 215, (4, 4, 4, 3)), 4, 1), 4, 2).astype(np.uint8)
    noisy = p("noise:12")(blocks)
    err = lambda x: np.abs(x.astype(float) - blocks).mean()  # noqa: E731
    assert err(p("denoise:0.05")(noisy)) < 0.8 * err(noisy)


@pytest.mark.parametrize("spec, message", [
    ("jpeg", "jpeg takes jpeg:QUALITY, got 0 level(s)"),
    ("jpeg:abc", "QUALITY must be an integer 1-100, got 'abc'"),
    ("jpeg:0", "QUALITY must be an integer 1-100"),
    ("jpeg:75:2", "got 2 level(s)"),
    ("rot90:3", "rot90 takes rot90, got 1 level(s)"),
    ("noise:-1", "SIGMA must be grey levels >= 0"),
    ("noise:nan", "SIGMA must be"),
    ("resize:1.5", "FACTOR must be in (0, 1]"),
    ("pgd:2:0", "STEPS must be an integer >= 1"),
    ("sharpen:2", "unknown name 'sharpen'; expected one of rot90"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(perturb.PerturbationError) as e:
        p(spec)
    assert f"perturbation {spec!r}" in str(e.value) and message in str(e.value)


def test_spec_levels_defaults_and_duplicates():
    assert p("pgd:2").levels == (2.0, 10) and p("pgd:2:5").levels == (2.0, 5)
    assert p(" JPEG:80 ").levels == (80,) and p("jpeg:80").name == "jpeg"
    with pytest.raises(perturb.PerturbationError, match="given twice: jpeg:75"):
        perturb.parse_specs(["jpeg:75", "rot90", "jpeg:75"])
    with pytest.raises(perturb.PerturbationError, match="takes uint8"):
        p("rot90")(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(perturb.PerturbationError, match="pass attack= and label_rows="):
        p("fgsm:2")(np.zeros((1, SIZE, SIZE, 3), np.uint8))


@pytest.fixture(scope="module")
def tiny_attack():
    cfg = models.model_config("renet", size="tiny")
    cfg.update(image_size=SIZE, depth=3)
    model = models.build_model(cfg)
    x = np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.uint8)
    variables = numpy_variables(cfg)  # no compiled initialiser: seconds less on a CPU
    matrix = targets.label_matrix(synthetic.label_tables(6, seed=2))
    attack = perturb.Attack(apply=lambda v, im: model.apply(v, pipeline.normalize(im), train=False),
                            variables=variables, class_weights=targets.class_weights(matrix),
                            batch_size=4)  # 6 images: one full batch and one padded one
    return attack, x, matrix


def test_fgsm_and_pgd_raise_the_parsing_loss_within_the_eps_ball(tiny_attack):
    attack, x, rows = tiny_attack
    whole = dataclasses.replace(attack, batch_size=len(x))  # 6 images in one batch
    clean, grad = whole.loss_and_grad(x.astype(np.float32), rows)
    assert np.abs(grad).sum() > 0
    for spec in ("fgsm:8", "pgd:8:3"):
        out = p(spec)(x, attack=attack, label_rows=rows)
        assert out.shape == x.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - x).max() <= 8
        assert whole.loss_and_grad(out.astype(np.float32), rows)[0] > clean, spec
    # FGSM moves each pixel by eps along the sign of the gradient of its batch's loss (where that
    # stays inside 0..255, and where the gradient is not ~0, whose sign is float rounding). The
    # class-weighted cross-entropies normalise by the batch's weights, so the direction depends on
    # the batch: here one batch of all 6 images, the batch `grad` was computed on.
    out = p("fgsm:8")(x, attack=whole, label_rows=rows).astype(int)
    inside = (x >= 8) & (x <= 247) & (np.abs(grad) > 1e-3 * np.abs(grad).max())
    assert inside.mean() > 0.8
    assert np.array_equal((out - x)[inside], 8 * np.sign(grad)[inside].astype(int))
    assert np.array_equal(p("fgsm:0")(x, attack=attack, label_rows=rows), x)
