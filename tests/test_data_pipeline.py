"""The input pipeline: deterministic order, restored state, device-resident == grain, labels, scale run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_data_re116 import NAMES, add_bad_files, cli_args, fixture_dataset, make_tree, write_image

from adaparse_jax import prepare, targets
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data import pipeline
from adaparse_jax.data.cache import Cache, PrepareSettings
from adaparse_jax.data.pipeline import Loader


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tree = make_tree(root, per_generator=5)
    ds = fixture_dataset(tree)
    cache_lib.prepare_dataset(
        ds, root / "cache", settings=PrepareSettings(size=16, shard_size=4), workers=1, progress=False
    )
    return {"ds": ds, "cache": Cache(root / "cache")}


def _host(batches):
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def _take(loader, n):
    return _host(next(loader) for _ in range(n))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["generator"], y["generator"])


def test_normalize_matches_torchvision_arithmetic():
    x = np.arange(256, dtype=np.uint8).reshape(4, 4, 16, 1).repeat(3, -1)
    ref = (x.astype(np.float32) / np.float32(255) - np.float32(0.6490)) / np.float32(0.1269)
    np.testing.assert_allclose(np.asarray(pipeline.normalize(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)
    assert pipeline.normalize(jnp.asarray(x), jnp.bfloat16).dtype == jnp.bfloat16


def test_labels_are_gathered_by_generator_row(built):
    matrix = built["ds"].labels
    table = pipeline.put_labels(matrix)
    gen = np.array([5, 0, 2, 2], np.int32)
    got = pipeline.gather_labels(table, jnp.asarray(gen))
    want = targets.split_labels(matrix[gen])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])
    with pytest.raises(ValueError, match=r"expected \[G, 28\]"):
        pipeline.put_labels(matrix[:, :27])


def test_batch_order_is_a_seeded_permutation_per_epoch():
    a = pipeline.batch_indices(50, 8, seed=3)
    b = pipeline.batch_indices(50, 8, seed=3)
    c = pipeline.batch_indices(50, 8, seed=4)
    assert len(a) == 6  # 50 // 8: the epoch's last 2 records are dropped
    ep0 = np.stack([a[i] for i in range(6)])
    ep1 = np.stack([a[6 + i] for i in range(6)])
    np.testing.assert_array_equal(ep0, np.stack([b[i] for i in range(6)]))
    assert len(set(ep0.ravel())) == 48 and len(set(ep1.ravel())) == 48 and ep0.max() < 50
    assert (ep0 != ep1).any() and (ep0 != np.stack([c[i] for i in range(6)])).any()
    ev = pipeline.batch_indices(50, 8, shuffle=False, drop_remainder=False)
    np.testing.assert_array_equal(np.concatenate([ev[i] for i in range(len(ev))]), np.arange(50))


def test_training_epochs_read_the_right_records(built):
    c = built["cache"]
    gens = ["AAE", "CONTRAGAN", "WGANGP"]
    records = c.records(gens)
    with Loader(c, gens, batch_size=4, seed=0) as loader:
        steps = loader.steps_per_epoch
        assert steps == len(records) // 4
        epochs = [_take(loader, steps) for _ in range(2)]
    for epoch in epochs:
        images = np.concatenate([b["image"] for b in epoch])
        generator = np.concatenate([b["generator"] for b in epoch])
        assert images.shape == (steps * 4, 16, 16, 3) and images.dtype == np.uint8
        # every image is a distinct cache record of these generators, with its own generator id
        all_images = c.read(records).reshape(len(records), -1)
        where = [np.flatnonzero((all_images == im.reshape(-1)).all(1)) for im in images]
        assert all(len(w) >= 1 for w in where)
        positions = [w[0] for w in where]
        assert len(set(positions)) == len(positions)
        np.testing.assert_array_equal(generator, c.generator[records[positions]])
        assert set(generator) <= {NAMES.index(g) for g in gens}
    assert not np.array_equal(epochs[0][0]["image"], epochs[1][0]["image"])


@pytest.mark.parametrize("mode", ["grain", "device"])
def test_evaluation_is_one_ordered_pass(built, mode):
    c = built["cache"]
    loader = Loader(c, batch_size=7, train=False, mode=mode)
    batches = _host(loader)
    assert [len(b["generator"]) for b in batches] == [7] * (len(c) // 7) + (
        [len(c) % 7] if len(c) % 7 else []
    )
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), c.read(np.arange(len(c))))
    np.testing.assert_array_equal(np.concatenate([b["generator"] for b in batches]), c.generator)
    assert not _host(loader)  # one pass only, until reset
    loader.reset()
    _assert_same(_host(loader), batches)


def test_same_seed_same_batches_other_seed_other_batches(built):
    c = built["cache"]
    a = _take(Loader(c, batch_size=5, seed=11), 12)
    b = _take(Loader(c, batch_size=5, seed=11), 12)
    other = _take(Loader(c, batch_size=5, seed=12), 12)
    _assert_same(a, b)
    assert any((x["generator"] != y["generator"]).any() for x, y in zip(a, other, strict=True))


def test_device_resident_yields_the_grain_batches(built):
    c = built["cache"]
    gens = list(NAMES[1:])
    n = 3 * Loader(c, gens, batch_size=6).steps_per_epoch + 2  # three epochs and a bit
    grain_batches = _take(Loader(c, gens, batch_size=6, seed=5, mode="grain"), n)
    device_batches = _take(Loader(c, gens, batch_size=6, seed=5, mode="device"), n)
    _assert_same(grain_batches, device_batches)


@pytest.mark.parametrize(
    "save_mode,load_mode", [("grain", "grain"), ("device", "device"), ("device", "grain")]
)
def test_restored_loader_continues_identically(built, save_mode, load_mode):
    c = built["cache"]
    first = Loader(c, batch_size=4, seed=2, mode=save_mode)
    steps = first.steps_per_epoch
    _take(first, steps + 3)
    state = first.get_state()
    assert (state["epoch"], state["step"]) == (1, 3)
    expected = _take(first, steps)  # crosses into epoch 2
    resumed = Loader(c, batch_size=4, seed=2, mode=load_mode)
    resumed.set_state(state)
    _assert_same(_take(resumed, steps), expected)
    # rewinding the same loader works as well
    first.set_state(state)
    _assert_same(_take(first, 2), expected[:2])
    with pytest.raises(ValueError, match="seed=2 but this loader has seed=3"):
        Loader(c, batch_size=4, seed=3).set_state(state)


def test_grain_iterator_state_round_trip(built):
    """grain's own DatasetIterator state (for grain's checkpoint handler) restores too."""
    loader = Loader(built["cache"], batch_size=4, seed=8)
    it = iter(loader.grain_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = _host(next(it) for _ in range(6))
    it2 = iter(loader.grain_dataset())
    it2.set_state(state)
    _assert_same(_host(next(it2) for _ in range(6)), expected)


def test_worker_processes_give_the_same_batches_and_state(built):
    c = built["cache"]
    single = _take(Loader(c, batch_size=4, seed=6), 14)
    with Loader(c, batch_size=4, seed=6, num_workers=2) as multi:
        _assert_same(_take(multi, 9), single[:9])
        state = multi.get_state()
    resumed = Loader(c, batch_size=4, seed=6)  # the state does not depend on the worker count
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), single[9:])


def test_generators_follow_the_label_names(built):
    c = built["cache"]
    order = tuple(reversed(NAMES))  # a label table in another row order
    batch = _host([next(iter(Loader(c, ["CONT_ENC"], batch_size=2, names=order)))])[0]
    assert (batch["generator"] == order.index("CONT_ENC")).all()
    with pytest.raises(ValueError, match="not in the label names"):
        Loader(c, ["AAE"], batch_size=2, names=("CONT_ENC",))
    with pytest.raises(ValueError, match="make no batch"):
        Loader(c, ["AAE"], batch_size=1000)


def test_few_thousand_mixed_images_end_to_end(tmp_path, capsys):
    """The issue's "done when": a few thousand mixed images, every skipped file reported, a cache the
    pipeline reads deterministically."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    tree = make_tree(root, per_generator=1, mixed=True)
    modes = ("RGB", "L", "RGBA", "P", "1", "CMYK")
    formats = (".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm")
    count = 0
    for g, name in enumerate(NAMES):
        for i in range(400):
            mode = modes[(i + g) % len(modes)]
            suffix = formats[i % len(formats)]
            if mode in ("RGBA", "P") and suffix in (".jpg", ".ppm"):
                suffix = ".png"
            if mode == "CMYK" and suffix not in (".jpg", ".tiff"):
                suffix = ".jpg"
            write_image(
                tree["images"] / name / f"many_{i:04d}{suffix}",
                rng,
                mode,
                (int(rng.integers(6, 40)), int(rng.integers(6, 40))),
            )
            count += 1
    bad = {name: add_bad_files(tree["images"] / name / "bad") for name in NAMES[::2]}
    out = tmp_path / "cache"
    args = cli_args(tree, out, "--workers", "2", "--size", "16", "--shard-size", "250")
    assert prepare.main(args) == 0
    report = capsys.readouterr().out
    expected_skips = {f"{name}/bad/{f}" for name, files in bad.items() for f in files}
    reported = {line.split(": ")[0].strip() for line in report.splitlines() if line.startswith("  ")}
    assert reported == expected_skips
    c = Cache(out)
    assert c.manifest["totals"]["skipped"] == len(expected_skips)
    assert len(c) == count + len(NAMES) + 12  # + make_tree's images and its 12 mixed-mode files
    split = fixture_dataset(tree).test_splits["1"]
    train = [n for n in NAMES if n not in split]
    runs = [
        _take(Loader(c, train, batch_size=64, seed=1, mode=mode), 40) for mode in ("grain", "grain", "device")
    ]
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])
    assert prepare.main(args) == 0  # a rerun reuses every shard
    assert "0 shard(s) decoded" in capsys.readouterr().out
