"""The decoded cache: official resize, every image mode, skipped files, resuming, settings, CLI."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from test_data_re116 import (
    MIXED_IMAGES,
    NAMES,
    add_bad_files,
    cli_args,
    fixture_dataset,
    make_tree,
    write_image,
)

from adaparse_jax import prepare
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data.cache import Cache, CacheError, EmptyGeneratorsError, PrepareSettings


def _pil_reference(path, size=64):
    """What torchvision's ImageFolder loader + Resize((size, size)) hands to ToTensor()."""
    with open(path, "rb") as f:
        image = Image.open(f).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear: a triangle of radius 1 output pixel, widened by the downscale factor."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / support, 0, None)
    return w / w.sum(1, keepdims=True)


def _numpy_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Independent float reference of the separable resize (horizontal pass, rounded, vertical)."""
    h = np.einsum("oi,hic->hoc", _triangle_weights(rgb.shape[1], size), rgb.astype(np.float64), optimize=True)
    h = np.clip(np.round(h), 0, 255)
    return np.clip(
        np.round(np.einsum("oi,ihc->ohc", _triangle_weights(rgb.shape[0], size), h, optimize=True)), 0, 255
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    tree = make_tree(root)
    expected_skips = add_bad_files(tree["images"] / "WGAN_DRA")
    (tree["images"] / "WGAN_DRA" / "sub").mkdir()  # an empty sub-folder is harmless
    ds = fixture_dataset(tree)
    out = root / "cache"
    manifest = cache_lib.prepare_dataset(
        ds, out, settings=PrepareSettings(shard_size=5), workers=1, progress=False
    )
    return {"tree": tree, "ds": ds, "out": out, "manifest": manifest, "skips": expected_skips}


def test_every_mode_decodes_as_torchvision_would(prepared):
    c = Cache(prepared["out"])
    paths = c.paths
    images = prepared["tree"]["images"]
    for file, _, _ in MIXED_IMAGES:
        i = paths.index(f"AAE/mixed/{file}")
        np.testing.assert_array_equal(c.read([i])[0], _pil_reference(images / paths[i]), err_msg=file)
    modes = prepared["manifest"]["generators"][0]["modes"]
    assert {"RGB", "L", "1", "RGBA", "LA", "P", "CMYK", "I;16"} <= set(modes)


@pytest.mark.parametrize("shape", [(97, 131), (30, 40), (40, 300), (1024, 768), (16, 16)])
def test_resize_is_antialiased_bilinear(tmp_path, shape):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    out = cache_lib.decode_image(tmp_path / "x.png")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _pil_reference(tmp_path / "x.png"))
    # PIL works in fixed point; the float reference agrees to within rounding.
    assert np.abs(out.astype(int) - _numpy_resize(rgb, 64)).max() <= 2
    point_sampled = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.NEAREST)).astype(int)
    assert np.abs(point_sampled - _numpy_resize(rgb, 64)).max() > 50  # the reference can tell filters apart


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent red: torchvision's convert("RGB") keeps the red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = cache_lib.decode_image(tmp_path / "a.png", size=8)
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_sixteen_bit_clip_is_official_and_scale_keeps_the_picture(tmp_path):
    rng = np.random.default_rng(2)
    v = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "d.png")
    clip = cache_lib.decode_image(tmp_path / "d.png", size=32)
    np.testing.assert_array_equal(clip, _pil_reference(tmp_path / "d.png", 32))
    assert (clip == 255).mean() > 0.99  # PIL clips 16-bit values to 255: an almost white image
    scaled = cache_lib.decode_image(tmp_path / "d.png", size=32, high_bit_depth="scale")
    np.testing.assert_array_equal(scaled[..., 0], scaled[..., 2])
    np.testing.assert_allclose(scaled[..., 0].astype(float), v / 257.0, atol=0.51)


def test_manifest_lists_counts_and_every_skipped_file(prepared):
    m = prepared["manifest"]
    by_name = {g["name"]: g for g in m["generators"]}
    assert [g["name"] for g in m["generators"]] == list(NAMES)
    assert by_name["AAE"]["images"] == 3 + len(MIXED_IMAGES) and by_name["AAE"]["skipped"] == 0
    skips = prepared["skips"]
    assert by_name["WGAN_DRA"]["images"] == 3 and by_name["WGAN_DRA"]["skipped"] == len(skips)
    got = {s["path"]: s for s in m["skipped"]}
    assert set(got) == {f"WGAN_DRA/{f}" for f in skips}
    for f, reason in skips.items():
        assert got[f"WGAN_DRA/{f}"]["reason"].startswith(reason)
        assert got[f"WGAN_DRA/{f}"]["generator"] == "WGAN_DRA"
    assert m["totals"] == {
        "files": sum(g["files"] for g in m["generators"]),
        "images": sum(g["images"] for g in m["generators"]),
        "skipped": len(skips),
    }
    s = m["settings"]
    assert s["size"] == 64 and s["high_bit_depth"] == "clip" and s["pillow"] == Image.__version__
    assert s["source_root"] == str(prepared["tree"]["images"].resolve()) and s["names"] == list(NAMES)
    assert json.loads((prepared["out"] / "manifest.json").read_text()) == m


def test_records_are_sorted_by_row_then_path(prepared):
    c = Cache(prepared["out"])
    assert len(c) == prepared["manifest"]["totals"]["images"] == len(c.paths)
    assert (np.diff(c.generator) >= 0).all()
    for row, name in enumerate(NAMES):
        paths = [p for p, g in zip(c.paths, c.generator, strict=True) if g == row]
        assert paths == sorted(paths) and all(p.startswith(name + "/") for p in paths)
    np.testing.assert_array_equal(c.records(["CONTRAGAN"]), np.flatnonzero(c.generator == 2))
    item = c[5]
    np.testing.assert_array_equal(item["image"], c.read([5])[0])
    assert item["generator"] == c.generator[5]
    with pytest.raises(CacheError, match="no generator.*STYLEGAN"):
        c.records(["STYLEGAN"])


def _shard_mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}


def test_rerun_resumes_and_redoes_only_changed_shards(tmp_path):
    tree = make_tree(tmp_path, per_generator=6, mixed=False)
    ds = fixture_dataset(tree)
    out = tmp_path / "cache"
    settings = PrepareSettings(shard_size=4)
    first = cache_lib.prepare_dataset(ds, out, settings=settings, workers=1, progress=False)
    assert first["prepare"]["shards_run"] == 2 * len(NAMES)
    before = _shard_mtimes(out)
    again = cache_lib.prepare_dataset(ds, out, settings=settings, workers=1, progress=False)
    assert again["prepare"]["shards_run"] == 0 and _shard_mtimes(out) == before
    # An interrupted run: one shard's completion mark is missing, another left a temporary file.
    (out / "shards" / "0002-CONTRAGAN-0001.json").unlink()
    (out / "shards" / "0003-WGAN_DRA-0000.npy.tmp123").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        Cache(out)
    resumed = cache_lib.prepare_dataset(ds, out, settings=settings, workers=1, progress=False)
    assert resumed["prepare"]["shards_run"] == 1
    assert not list((out / "shards").glob("*.tmp*"))
    # A changed source file redoes its shard only, and the cache holds the new pixels.
    changed = tree["images"] / "WGANGP" / "img_005.png"
    write_image(changed, np.random.default_rng(9), size=(50, 50))
    os.utime(changed, ns=(1, 1))
    redone = cache_lib.prepare_dataset(ds, out, settings=settings, workers=1, progress=False)
    assert redone["prepare"]["shards_run"] == 1
    c = Cache(out)
    np.testing.assert_array_equal(c.read([c.paths.index("WGANGP/img_005.png")])[0], _pil_reference(changed))
    assert c.manifest["totals"] == first["totals"]


def test_generator_subsets_add_up(tmp_path):
    tree = make_tree(tmp_path, per_generator=2, mixed=False)
    for name in NAMES[2:]:  # only two generators on disk so far
        for f in (tree["images"] / name).iterdir():
            f.unlink()
        (tree["images"] / name).rmdir()
    ds, out = fixture_dataset(tree), tmp_path / "cache"
    with pytest.raises(cache_lib.re116.DatasetError, match="have no folder"):
        cache_lib.prepare_dataset(ds, out, workers=1, progress=False)
    cache_lib.prepare_dataset(ds, out, workers=1, progress=False, generators=["AAE"])
    m = cache_lib.prepare_dataset(ds, out, workers=1, progress=False, generators=["CONT_ENC"])
    assert [g["name"] for g in m["generators"]] == ["AAE", "CONT_ENC"] and m["prepare"]["shards_run"] == 1
    c = Cache(out)
    assert len(c.records(["AAE"])) == 2 and len(c.records(["CONT_ENC"])) == 2
    assert [g["folder"] for g in m["generators"]] == ["AAE", "CONT_ENC"]
    with pytest.raises(CacheError, match="holds no image of generator.*WGANGP"):
        c.records(["WGANGP"])


def test_other_settings_are_refused_or_rebuilt(tmp_path):
    tree = make_tree(tmp_path, per_generator=2, mixed=False)
    ds = fixture_dataset(tree)
    out = tmp_path / "cache"
    cache_lib.prepare_dataset(ds, out, workers=1, progress=False)
    with pytest.raises(
        CacheError, match=r"other settings:\n  - size: cache has 64, requested 32\n.*--rebuild"
    ):
        cache_lib.prepare_dataset(ds, out, settings=PrepareSettings(size=32), workers=1, progress=False)
    with pytest.raises(CacheError, match="high_bit_depth: cache has 'clip', requested 'scale'"):
        cache_lib.prepare_dataset(
            ds, out, settings=PrepareSettings(high_bit_depth="scale"), workers=1, progress=False
        )
    assert Cache(out).size == 64  # refusing left the cache intact
    cache_lib.prepare_dataset(
        ds, out, settings=PrepareSettings(size=32), workers=1, progress=False, rebuild=True
    )
    c = Cache(out)
    assert c.size == 32 and c.read([0]).shape == (1, 32, 32, 3)
    assert len(list((out / "shards").glob("*.npy"))) == len(NAMES)


def test_foreign_output_directory_is_refused(tmp_path):
    tree = make_tree(tmp_path, per_generator=1, mixed=False)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(CacheError, match="not empty and holds no cache.*thesis.tex"):
        cache_lib.prepare_dataset(fixture_dataset(tree), out, workers=1, progress=False)


def test_parallel_prepare_equals_serial(tmp_path):
    tree = make_tree(tmp_path, per_generator=4)
    add_bad_files(tree["images"] / "CONT_ENC")
    ds = fixture_dataset(tree)
    a = cache_lib.prepare_dataset(
        ds, tmp_path / "a", settings=PrepareSettings(shard_size=3), workers=1, progress=False
    )
    b = cache_lib.prepare_dataset(
        ds, tmp_path / "b", settings=PrepareSettings(shard_size=3), workers=2, progress=False
    )
    for key in ("totals", "generators", "skipped", "shards"):
        assert a[key] == b[key]
    ca, cb = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    np.testing.assert_array_equal(ca.read(np.arange(len(ca))), cb.read(np.arange(len(cb))))
    assert ca.paths == cb.paths


def test_generator_with_only_bad_files_fails_after_recording_them(tmp_path):
    tree = make_tree(tmp_path, per_generator=1, mixed=False)
    folder = tree["images"] / "WGAN_WC"
    for f in folder.iterdir():
        f.unlink()
    (folder / "a.png").write_bytes(b"junk")
    with pytest.raises(EmptyGeneratorsError, match="every file was skipped for generator.*WGAN_WC") as e:
        cache_lib.prepare_dataset(fixture_dataset(tree), tmp_path / "c", workers=1, progress=False)
    assert e.value.manifest["skipped"][0]["path"] == "WGAN_WC/a.png"


def test_validation_runs_before_any_work(tmp_path):
    tree = make_tree(tmp_path, per_generator=1, mixed=False)
    for f in (tree["images"] / "AAE").iterdir():
        f.unlink()
    with pytest.raises(cache_lib.re116.DatasetError, match="without any image: AAE"):
        cache_lib.prepare_dataset(fixture_dataset(tree), tmp_path / "c", workers=1, progress=False)
    assert not (tmp_path / "c").exists()


def test_unlabelled_folder(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "mystery"
    for i, (file, mode, size) in enumerate(MIXED_IMAGES[:6]):
        write_image(folder / ("nested" if i % 2 else "") / file, rng, mode, size)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    m = cache_lib.prepare_folder(folder, tmp_path / "c", workers=1, progress=False)
    assert m["totals"] == {"files": 7, "images": 6, "skipped": 1}
    assert m["skipped"][0]["path"] == "mystery/broken.jpg" and m["settings"]["labelled"] is False
    c = Cache(tmp_path / "c")
    assert c.names is None and (c.generator == cache_lib.UNLABELLED).all()
    for i, p in enumerate(c.paths):
        np.testing.assert_array_equal(c.read([i])[0], _pil_reference(tmp_path / p))
    with pytest.raises(CacheError, match="unlabelled"):
        c.records(["AAE"])
    from adaparse_jax.data.pipeline import Loader  # images of unknown origin, in path order, generator -1

    batches = list(Loader(c, batch_size=4, train=False))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), c.read(np.arange(len(c))))
    assert all((np.asarray(b["generator"]) == cache_lib.UNLABELLED).all() for b in batches)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cache_lib.re116.DatasetError, match="holds no file with an image extension"):
        cache_lib.prepare_folder(empty, tmp_path / "d", workers=1, progress=False)


def test_cli_reports_skips_and_refuses_bad_trees(tmp_path, capsys):
    tree = make_tree(tmp_path, per_generator=2, mixed=False)
    skips = add_bad_files(tree["images"] / "AAE")
    (tree["images"] / "EXTRA").mkdir()
    args = cli_args(tree, tmp_path / "c", "--workers", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare.main(args) == 0
    out, err = capsys.readouterr()
    for f, reason in skips.items():
        assert f"  AAE/{f}: {reason}" in out
    assert f"{len(skips)} skipped" in out and "warning: RE-116: 1 folder(s)" in err and "EXTRA" in err
    assert prepare.main(args + ["--size", "32"]) == 2
    assert "error: cache" in capsys.readouterr().err
    (tree["labels"] / "ground_truth_net_116_15dim.npy").rename(tree["labels"] / "net.npy")
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert "missing: ground_truth_net_116_15dim.npy" in err and "found in the directory: " in err
    assert (
        prepare.main(
            [
                "--folder",
                str(tree["images"] / "CONT_ENC"),
                "--out",
                str(tmp_path / "u"),
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "CONT_ENC: 1 generator(s), 2 files -> 2 images, 0 skipped" in capsys.readouterr().out
