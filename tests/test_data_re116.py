"""RE-116 dataset description: shipped names and splits, label loading by name, validation errors.

Also holds the fixture-tree writers that test_data_cache.py and test_data_pipeline.py import.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_or_fail
from PIL import Image

from adaparse_jax import targets
from adaparse_jax.data import re116
from adaparse_jax.data.re116 import DatasetError, ExtraFoldersWarning

# -- fixture writers (shared with the other test_data_* modules) ----------------------------------

NAMES = ("AAE", "CONT_ENC", "CONTRAGAN", "WGAN_DRA", "WGAN_WC", "WGANGP")  # label-row order


def random_tables(num_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid official-format tables (float64, official column order)."""
    rng = np.random.default_rng(seed)
    net = np.zeros((num_rows, 15))
    net[:, :9] = rng.random((num_rows, 9))
    for t in targets.DISCRETE_TARGETS:
        net[:, t.column] = rng.integers(0, t.num_classes, num_rows)
    return {
        targets.NET_TABLE: net,
        targets.LOSS10_TABLE: rng.integers(0, 2, (num_rows, 10)).astype(np.float64),
        targets.LOSS3_TABLE: rng.integers(0, 2, (num_rows, 3)).astype(np.float64),
    }


def write_labels(directory: Path, tables: dict[str, np.ndarray], variant: str = re116.RE116) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, table in tables.items():
        np.save(directory / re116.LABEL_FILES[variant][key], table)


def write_image(
    path: Path, rng: np.random.Generator, mode: str = "RGB", size=(40, 30), fmt: str | None = None
):
    """A random image of `mode` and `size` (w, h); the format follows the suffix unless `fmt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode in ("1", "L", "P"):
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        image = image.convert(mode) if mode == "1" else image
        if mode == "P":
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16)
    else:
        channels = len(Image.new(mode, (1, 1)).getbands())
        image = Image.fromarray(
            rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze(), None if channels > 1 else "L"
        )
        if image.mode != mode:
            image = Image.frombytes(mode, (w, h), image.tobytes())
    image.save(path, fmt)
    return path


# (file name, mode, size): every mode the loader must handle, in several formats and sizes.
MIXED_IMAGES = (
    ("rgb.png", "RGB", (40, 30)),
    ("rgb_big.jpg", "RGB", (131, 97)),
    ("gray.png", "L", (28, 28)),
    ("bw.bmp", "1", (33, 20)),
    ("rgba.png", "RGBA", (50, 64)),
    ("la.png", "LA", (64, 64)),
    ("palette.png", "P", (45, 45)),
    ("cmyk.jpg", "CMYK", (60, 40)),
    ("cmyk.tiff", "CMYK", (20, 70)),
    ("deep.png", "I;16", (37, 41)),
    ("small.webp", "RGB", (16, 16)),
    ("wide.ppm", "RGB", (300, 40)),
)


def make_tree(
    root: Path,
    names=NAMES,
    per_generator: int = 3,
    seed: int = 0,
    mixed: bool = True,
    splits: dict | None = None,
) -> dict:
    """An RE-116-layout tree: images/<NAME>/..., labels/<official files>, models.txt, splits.json.

    The first generator gets every image mode of MIXED_IMAGES plus bad files; the others plain PNGs.
    Returns paths and the label tables.
    """
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    for g, name in enumerate(names):
        for i in range(per_generator):
            write_image(images / name / f"img_{i:03d}.png", rng, size=(24 + 7 * i, 30))
        if mixed and g == 0:
            for file, mode, size in MIXED_IMAGES:
                write_image(images / name / "mixed" / file, rng, mode, size)
    tables = random_tables(len(names), seed)
    write_labels(labels, tables)
    (root / "models.txt").write_text("\n".join(names) + "\n")
    (root / "splits.json").write_text(
        json.dumps({"test_splits": splits or {"1": [names[1]], "2": [names[-1]]}})
    )
    return {
        "images": images,
        "labels": labels,
        "names": root / "models.txt",
        "splits": root / "splits.json",
        "tables": tables,
    }


def add_bad_files(folder: Path) -> dict[str, str]:
    """Corrupt, truncated, zero-byte and non-image files; returns relative name -> expected reason."""
    good = folder / "ok_for_truncation.png"
    rng = np.random.default_rng(5)
    write_image(good, rng, size=(64, 64))
    data = good.read_bytes()
    good.unlink()
    jpg = folder / "tmp.jpg"
    write_image(jpg, rng, size=(64, 64))
    jdata = jpg.read_bytes()
    jpg.unlink()
    (folder / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    )
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "truncated.jpg").write_bytes(jdata[: len(jdata) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image")
    (folder / "text_named.png").write_text("not an image either")
    return {
        "corrupt.png": "cannot decode",
        "truncated.png": "cannot decode",
        "truncated.jpg": "cannot decode",
        "zero.jpg": "empty file",
        "readme.txt": "not an image extension",
        "text_named.png": "cannot decode",
    }


def fixture_dataset(tree: dict, **kwargs) -> re116.Dataset:
    return re116.load_dataset(
        images=tree["images"], labels=tree["labels"], names=tree["names"], splits=tree["splits"], **kwargs
    )


def cli_args(tree: dict, out, *extra: str) -> list[str]:
    """`python -m adaparse_jax.prepare` arguments for a make_tree tree."""
    parts = {"--images": tree["images"], "--labels": tree["labels"], "--names": tree["names"]}
    parts.update({"--splits": tree["splits"], "--out": out})
    return [str(x) for kv in parts.items() for x in kv] + ["--no-progress", *extra]


def shipped_re116() -> re116.Dataset:
    """The shipped RE-116 names and splits, with empty labels (for split tests)."""
    names = re116.variant_names(re116.RE116)
    return re116.Dataset("RE-116", names, np.zeros((116, 28), np.float32), Path("."),
                         re116.variant_splits(re116.RE116))  # fmt: skip


@pytest.fixture
def shared_re116():
    path = Path(__file__).resolve().parents[2] / "shared" / "reference" / "re116"
    if not path.is_dir():
        skip_or_fail("../shared/reference/re116 is not present")
    return path


# -- shipped facts -------------------------------------------------------------------------------


def test_shipped_names_and_splits_match_reference(shared_re116):
    assert re116.variant_names(re116.RE116) == tuple((shared_re116 / "models.txt").read_text().split())
    assert re116.variant_splits(re116.RE116) == re116.read_splits(shared_re116 / "splits.json")


def test_shipped_splits_are_12_test_104_train():
    ds = shipped_re116()
    seen = set()
    for k in ("1", "2", "3", "4"):
        split = re116.make_split(ds, k)
        assert len(split.test) == 12 and len(split.train) == 104 and not split.val
        assert not set(split.test) & set(split.train)
        seen |= set(split.test)
    assert len(seen) == 48  # the four test sets are disjoint


def test_row_order_is_not_the_folder_sort_order():
    names = re116.variant_names(re116.RE116)
    folder_order = sorted(names)  # ImageFolder's code-point sort, which the official scripts index by
    moved = {n for i, n in enumerate(names) if folder_order[i] != n}
    # models.txt puts WGAN_WC after WGANGP, so of the five names around "_" only WGAN_WC keeps its row.
    assert moved == {"CONT_ENC", "CONTRAGAN", "WGAN_DRA", "WGANGP"}


def test_labels_align_by_name_with_reference(shared_re116, tmp_path):
    """A real RE-116 label directory: every checked generator reads its own row (by models.txt)."""
    images = tmp_path / "images"
    ref_names = (shared_re116 / "models.txt").read_text().split()
    for name in ref_names:  # folders in code-point order on disk; rows must not follow it
        (images / name).mkdir(parents=True)
    ds = re116.load_dataset(images=images, labels=shared_re116)
    assert ds.variant == re116.RE116 and ds.labels.shape == (116, 28)
    net = np.load(shared_re116 / "ground_truth_net_116_15dim.npy")
    loss10 = np.load(shared_re116 / "ground_truth_loss_116_9dim.npy")
    loss3 = np.load(shared_re116 / "ground_truth_loss_116_3dim.npy")
    folder_order = sorted(ref_names)  # what ImageFolder would index
    for name in ("STYLEGAN", "CONT_ENC", "CONTRAGAN", "WGAN_DRA", "WGAN_WC", "WGANGP"):
        row = ds.row(name)
        assert row == ref_names.index(name)
        tables = targets.tables_from_matrix(ds.labels[row : row + 1])
        np.testing.assert_allclose(tables[targets.NET_TABLE][0], net[row])
        np.testing.assert_allclose(tables[targets.LOSS10_TABLE][0], loss10[row])
        np.testing.assert_allclose(tables[targets.LOSS3_TABLE][0], loss3[row])
        if name in ("CONT_ENC", "CONTRAGAN", "WGAN_DRA", "WGANGP"):  # mislabelled by the folder order
            assert folder_order.index(name) != row


def test_re123_labels_aliases_and_diffusion_splits(shared_re116, tmp_path):
    images = tmp_path / "images"
    for name in re116.variant_names(re116.RE116):
        (images / name).mkdir(parents=True)
        (images / name / "a.png").touch()
    for k in range(1, 8):  # the RE-Net release's diffusion folders
        (images / f"Z_{k}").mkdir()
        (images / f"Z_{k}" / "a.png").touch()
    ds = re116.load_dataset(images=images, labels=shared_re116, variant=re116.RE123)
    assert ds.labels.shape == (123, 28) and ds.names[116:] == (
        "ADM",
        "ADM_G",
        "DDPM",
        "DDIM",
        "LDM",
        "STABLE_DIFFUSION",
        "GLIDE",
    )
    dm_net = np.load(shared_re116 / "DM_net_arch.npy")
    np.testing.assert_allclose(targets.tables_from_matrix(ds.labels)[targets.NET_TABLE], dm_net)
    tree = re116.validate_tree(ds)
    assert tree.folders["ADM"] == "Z_1" and tree.folders["GLIDE"] == "Z_7" and tree.folders["AAE"] == "AAE"
    split = re116.make_split(ds, 3)
    assert split.test == ("ADM_G", "STABLE_DIFFUSION", "GLIDE")
    assert len(split.train) == 120 and "ADM" in split.train and "STYLEGAN" in split.train


def test_auto_variant_prefers_complete_set(shared_re116, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for f in re116.LABEL_FILES[re116.RE123].values():
        (labels / f).write_bytes((shared_re116 / f).read_bytes())
    assert re116.find_label_files(labels)[0] == re116.RE123


# -- validation errors ---------------------------------------------------------------------------


def test_valid_fixture_tree_loads(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    ds = fixture_dataset(tree)
    assert ds.names == NAMES
    np.testing.assert_array_equal(ds.labels, targets.label_matrix(tree["tables"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = re116.validate_tree(ds)
    assert [f.path for f in t.files["AAE"]] == [f"AAE/img_{i:03d}.png" for i in range(3)]


def test_missing_generators_are_listed_in_one_error(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    for name in ("CONT_ENC", "WGANGP"):
        for f in (tree["images"] / name).iterdir():
            f.unlink()
        (tree["images"] / name).rmdir()
    (tree["images"] / "wganGP").mkdir()  # a wrongly cased folder is suggested
    with pytest.raises(DatasetError) as e, pytest.warns(ExtraFoldersWarning):
        re116.validate_tree(fixture_dataset(tree))
    msg = str(e.value)
    assert "2 generator(s) have no folder" in msg and "CONT_ENC" in msg and "WGANGP" in msg
    assert "'wganGP' exists" in msg


def test_extra_folders_warn(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    (tree["images"] / "NOT_A_GAN").mkdir()
    (tree["images"] / "backup").mkdir()
    with pytest.warns(ExtraFoldersWarning, match="2 folder.*NOT_A_GAN, backup"):
        re116.validate_tree(fixture_dataset(tree))


def test_empty_generator_folder_is_an_error(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    for f in (tree["images"] / "WGAN_WC").iterdir():
        f.unlink()
    (tree["images"] / "WGAN_WC" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"without any image: WGAN_WC .*1 files, none with an image"):
        re116.validate_tree(fixture_dataset(tree))


def test_unknown_name_in_split_is_an_error(tmp_path):
    tree = make_tree(tmp_path, mixed=False, splits={"1": ["AAE", "STYLEGAN3"]})
    with pytest.raises(DatasetError, match=r"unknown generators: STYLEGAN3 \(split 1\)"):
        re116.validate_tree(fixture_dataset(tree))
    with pytest.raises(DatasetError, match="split 1 names unknown generators: STYLEGAN3"):
        re116.make_split(fixture_dataset(tree), 1)


def test_row_count_mismatch_is_an_error(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    np.save(
        tree["labels"] / re116.LABEL_FILES[re116.RE116][targets.LOSS3_TABLE],
        tree["tables"][targets.LOSS3_TABLE][:-1],
    )
    with pytest.raises(DatasetError, match=r"'loss3' .*has 5 rows but 6 generator names"):
        fixture_dataset(tree)


@pytest.mark.parametrize(
    "table,row,column,value,expect",
    [
        (targets.NET_TABLE, 3, 4, np.nan, r"row 3 \(generator WGAN_DRA\), column 4 \(norm_layers\).*nan"),
        (targets.NET_TABLE, 1, 2, 1.5, r"row 1 \(generator CONT_ENC\), column 2 \(fc_layers\).*\[0, 1\]"),
        (targets.NET_TABLE, 5, 9, 4.0, r"row 5 \(generator WGANGP\), column 9 \(normalization\).*0\.\.3"),
        (targets.LOSS10_TABLE, 2, 7, 0.5, r"row 2 \(generator CONTRAGAN\), column 7 \(adversarial\)"),
        (targets.LOSS3_TABLE, 0, 2, -1.0, r"row 0 \(generator AAE\), column 2 \(loss_group3\)"),
    ],
)
def test_invalid_label_names_generator_and_column(tmp_path, table, row, column, value, expect):
    tree = make_tree(tmp_path, mixed=False)
    bad = tree["tables"][table].copy()
    bad[row, column] = value
    np.save(tree["labels"] / re116.LABEL_FILES[re116.RE116][table], bad)
    with pytest.raises(DatasetError, match=expect):
        fixture_dataset(tree)


def test_misnamed_label_file_lists_expected_and_found(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    wrong = tree["labels"] / "ground_truth_loss_116_10dim.npy"
    (tree["labels"] / re116.LABEL_FILES[re116.RE116][targets.LOSS10_TABLE]).rename(wrong)
    with pytest.raises(DatasetError) as e:
        fixture_dataset(tree)
    msg = str(e.value)
    assert "missing: ground_truth_loss_116_9dim.npy" in msg
    assert "expected (RE-116): ground_truth_net_116_15dim.npy, ground_truth_loss_116_9dim.npy" in msg
    assert "expected (RE-123): DM_net_arch.npy" in msg
    assert "found in the directory: ground_truth_loss_116_10dim.npy, ground_truth_loss_116_3dim.npy" in msg
    assert "ground_truth_loss_116_10dim.npy looks like a misnamed ground_truth_loss_116_9dim.npy" in msg


def test_missing_label_directory_and_swapped_table(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    with pytest.raises(DatasetError, match="label directory .*nowhere does not exist"):
        re116.load_dataset(images=tree["images"], labels=tmp_path / "nowhere", names=tree["names"])
    # the 3-column table saved under the 10-column name: a shape error naming the file
    np.save(tree["labels"] / re116.LABEL_FILES[re116.RE116][targets.LOSS10_TABLE], tree["tables"]["loss3"])
    with pytest.raises(DatasetError, match=r"'loss10' .*ground_truth_loss_116_9dim.npy.*shape \(6, 3\)"):
        fixture_dataset(tree)


def test_all_tree_problems_in_one_error(tmp_path):
    tree = make_tree(tmp_path, mixed=False, splits={"1": ["NOPE"]})
    for f in (tree["images"] / "AAE").iterdir():
        f.unlink()
    for f in (tree["images"] / "WGANGP").iterdir():
        f.unlink()
    (tree["images"] / "WGANGP").rmdir()
    with pytest.raises(DatasetError) as e:
        re116.validate_tree(fixture_dataset(tree))
    msg = str(e.value)
    assert (
        "NOPE (split 1)" in msg
        and "have no folder" in msg
        and "WGANGP" in msg
        and "without any image: AAE" in msg
    )


def test_duplicate_names_and_bad_alias(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    tree["names"].write_text("AAE\nAAE\nX\nY\nZ\nW\n")
    with pytest.raises(DatasetError, match="more than once: AAE"):
        fixture_dataset(tree)
    tree["names"].write_text("\n".join(NAMES))
    with pytest.raises(DatasetError, match="aliases point to unknown generators: z1->NOPE"):
        fixture_dataset(tree, aliases={"z1": "NOPE"})


def test_alias_folder_and_ambiguity(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    (tree["images"] / "CONT_ENC").rename(tree["images"] / "context_encoder")
    ds = fixture_dataset(tree, aliases={"context_encoder": "CONT_ENC"})
    assert re116.validate_tree(ds).folders["CONT_ENC"] == "context_encoder"
    (tree["images"] / "CONT_ENC").mkdir()
    with pytest.raises(DatasetError, match="more than one folder: CONT_ENC: CONT_ENC, context_encoder"):
        re116.validate_tree(ds)


def test_dataset_json(tmp_path):
    tree = make_tree(tmp_path, mixed=False)
    desc = {
        "name": "zoo",
        "images": "images",
        "names": "models.txt",
        "splits": "splits.json",
        "labels": {k: f"labels/{f}" for k, f in re116.LABEL_FILES[re116.RE116].items()},
    }
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for path in (tmp_path, tmp_path / "dataset.json"):
        ds = re116.load_dataset(path)
        assert ds.name == "zoo" and ds.names == NAMES and ds.images == tmp_path / "images"
        np.testing.assert_array_equal(ds.labels, fixture_dataset(tree).labels)
    (tmp_path / "dataset.json").write_text(json.dumps({**desc, "lables": {}}))
    with pytest.raises(DatasetError, match=r"unknown keys \['lables'\]"):
        re116.load_dataset(tmp_path)


def test_validation_split_is_deterministic_by_seed(tmp_path):
    ds = shipped_re116()
    a = re116.make_split(ds, 2, num_val=8, val_seed=3)
    assert a == re116.make_split(ds, 2, num_val=8, val_seed=3)
    b = re116.make_split(ds, 2, num_val=8, val_seed=4)
    assert a.val != b.val and a.test == b.test
    assert len(a.val) == 8 and len(a.train) == 96
    assert not set(a.val) & (set(a.train) | set(a.test))
    assert set(a.val) | set(a.train) == set(re116.make_split(ds, 2).train)
    assert list(a.train) == [n for n in ds.names if n in set(a.train)]  # label-row order
    with pytest.raises(DatasetError, match="unknown split '7'"):
        re116.make_split(ds, 7)
