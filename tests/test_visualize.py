"""python -m adaparse_jax.visualize: the three pictures are written, and the arrays they plot equal
independent computations (NumPy spectra per true class; the t-SNE's input is the heads' input)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from parse_runs import write_tiny_run
from PIL import Image

import adaparse_jax
from adaparse_jax import targets, visualize
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data import re116

MEAN, STD = 0.6490, 0.1269  # the official input normalisation


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("viz"), "adaparse", manifest=True)


def numpy_log_spectrum(x):
    """[N, H, W, 3] -> log sqrt(max(|FFT(gray)|^2, 1e-4)), frequency 0 at the centre (even sizes)."""
    gray = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    f = np.fft.fft2(np.asarray(gray, np.float64))
    return np.log(np.fft.fftshift(np.sqrt(np.maximum(np.abs(f) ** 2, 1e-4)), axes=(-2, -1)))


def _test_images(run_dir, per_generator):
    """The run's test-split images as visualize reads them, and their true label rows."""
    dataset = re116.load_dataset(run_dir.parent / "dataset")
    split = re116.make_split(dataset, 1, num_val=1)
    cache = cache_lib.Cache(run_dir.parent / "cache")
    records = np.concatenate([cache.records([g])[:per_generator] for g in split.test])
    rows = dataset.rows([cache.names[g] for g in cache.generator[records]])
    return cache.read(records), dataset.labels[rows]


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300


def test_split_pictures_and_their_arrays(run_dir, tmp_path, monkeypatch):
    seen = []
    real_tsne = visualize.tsne
    monkeypatch.setattr(visualize, "tsne", lambda f, seed=0: seen.append(np.array(f)) or real_tsne(f, seed))
    result = visualize.visualize(run_dir, split="test", out=tmp_path, per_generator=5,
                                 spectra_of="fingerprint")
    assert set(result["files"]) == {"fingerprints", "class_spectra", "tsne"}
    for path in result["files"].values():
        _png_ok(path)
    pixels, labels = _test_images(run_dir, 5)
    arrays = result["arrays"]
    run = adaparse_jax.load(run_dir)
    out = jax.jit(run.apply)(run.variables, pixels)
    for a in targets.DISCRETE_TARGETS:
        # (b): per-class mean of NumPy log spectra of the attribute's own fingerprint.
        fps = np.asarray(out["fingerprints"][:, targets.head_index(a.name)], np.float64)
        spectra = numpy_log_spectrum(fps)
        y = labels[:, targets.column_index(a.name)].astype(int)
        np.testing.assert_array_equal(arrays["classes"][a.name], y)
        for k in range(a.num_classes):
            assert arrays["counts"][a.name][k] == (y == k).sum()
            if (y == k).any():
                np.testing.assert_allclose(arrays["means"][a.name][k], spectra[y == k].mean(axis=0),
                                           rtol=1e-4, atol=1e-4)
            else:
                assert np.isnan(arrays["means"][a.name][k]).all()
        # (c): the t-SNE's input is what the attribute's head reads: its dense layer on it gives
        # the model's own logits.
        head = run.variables["params"]["parser"][f"head_{a.name}"]
        feats = arrays["features"][a.name]
        assert feats.shape == (len(pixels), 8)  # the tiny parser's last FC width
        np.testing.assert_allclose(feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                                   np.asarray(out["logits"][a.name]), rtol=1e-4, atol=1e-5)
        assert arrays["embeddings"][a.name].shape == (len(pixels), 2)
    assert len(seen) == len(targets.DISCRETE_TARGETS)  # AdaParse: each head its own features
    for f, a in zip(seen, targets.DISCRETE_TARGETS):
        np.testing.assert_array_equal(f, arrays["features"][a.name])


def test_image_spectra_of_a_folder_of_the_datasets_images(run_dir, tmp_path, monkeypatch):
    # This test is about the spectra: the t-SNE (six of them, scikit-learn's, checked in the other
    # tests) is stood in for by the first two features.
    monkeypatch.setattr(visualize, "tsne", lambda f, seed=0: np.asarray(f, np.float64)[:, :2])
    images = run_dir.parent / "dataset" / "images"
    folder = tmp_path / "in"
    for g in ("SYN_00", "SYN_05"):
        shutil.copytree(images / g, folder / g)
    (folder / "SYN_00" / "broken.png").write_bytes(b"\x89PNG broken")
    result = visualize.visualize(run_dir, folder=folder, out=tmp_path / "out", spectra_of="image",
                                 index=3)
    # The copies lie outside the dataset's folders: no labels, only the fingerprint grid.
    assert set(result["files"]) == {"fingerprints"}
    assert any("class spectra and t-SNE skipped: 0 of 12 images have labels" in n for n in result["notes"])
    assert result["skipped"][0]["path"].endswith("broken.png")

    files = sorted((images / "SYN_00").glob("*.png")) + sorted((images / "SYN_05").glob("*.png"))
    result = visualize.visualize(run_dir, [str(p) for p in files], out=tmp_path / "out2",
                                 spectra_of="image")
    assert set(result["files"]) == {"fingerprints", "class_spectra", "tsne"}
    dataset = re116.load_dataset(run_dir.parent / "dataset")
    np.testing.assert_array_equal(result["arrays"]["rows"], dataset.rows(["SYN_00"] * 6 + ["SYN_05"] * 6))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    spectra = numpy_log_spectrum((pixels / 255.0 - MEAN) / STD)
    for a in targets.DISCRETE_TARGETS:
        y = dataset.labels[result["arrays"]["rows"], targets.column_index(a.name)].astype(int)
        for k in np.unique(y):
            np.testing.assert_allclose(result["arrays"]["means"][a.name][k], spectra[y == k].mean(axis=0),
                                       rtol=1e-4, atol=1e-4)


def test_renet_grid_and_one_shared_embedding(tmp_path, monkeypatch):
    run_dir = write_tiny_run(tmp_path, "renet", manifest=False)
    calls = []
    real_tsne = visualize.tsne
    monkeypatch.setattr(visualize, "tsne", lambda f, seed=0: calls.append(1) or real_tsne(f, seed))
    assert visualize.main(["--workdir", str(run_dir), "--split", "test", "--per-generator", "4",
                           "--out", str(tmp_path / "out")]) == 0
    for name in ("fingerprints.png", "class_spectra.png", "tsne.png"):
        _png_ok(tmp_path / "out" / name)
    assert len(calls) == 1  # every RE-Net head reads the one fingerprint's features


def test_cli_errors(run_dir, tmp_path, capsys):
    assert visualize.main(["--workdir", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "give image files, --folder DIR or --split" in capsys.readouterr().err
    assert visualize.main(["--workdir", str(tmp_path / "nope"), "--split", "test", "--out",
                           str(tmp_path)]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert visualize.main(["--workdir", str(run_dir), "--split", "val", "--index", "99", "--out",
                           str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --index 99: there are 6 images (0..5)"
