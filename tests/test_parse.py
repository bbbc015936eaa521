"""python -m adaparse_jax.parse: the report's content (class names, normalised probabilities next to
the official outputs, counts in real units, the whole set's vote), skipped files, and one clear line
(exit code 2) for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from parse_runs import COUNT_RANGES, init_variables, tiny_config, write_tiny_run
from PIL import Image

import adaparse_jax
from adaparse_jax import convert, parse, predict, targets
from adaparse_jax.zoo import schema


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("parse_zoo"), "adaparse", manifest=True)


@pytest.fixture(scope="module")
def folder(run_dir, tmp_path_factory):
    """Images of two generators, a truncated PNG and a text file."""
    f = tmp_path_factory.mktemp("user_images")
    images = run_dir.parent / "dataset" / "images"
    for g, n in (("SYN_00", 3), ("SYN_05", 2)):
        for i in range(n):
            shutil.copy(images / g / f"{i:04d}.png", f / f"{g}_{i}.png")
    (f / "broken.png").write_bytes((images / "SYN_01" / "0000.png").read_bytes()[:200])
    (f / "notes.txt").write_text("not an image")
    return f


@pytest.fixture(scope="module")
def report(run_dir, folder):
    return parse.parse(run_dir, folder=folder)


def _official_outputs(run_dir, paths):
    """The model's own outputs on the decoded files, through the public loader."""
    from adaparse_jax.data import cache as cache_lib

    run = adaparse_jax.load(run_dir)
    pixels = np.stack([cache_lib.decode_image(p, run.spec.image_size) for p in paths])
    return jax.jit(run.apply)(run.variables, pixels)


def test_report_names_classes_and_normalises_the_official_outputs(run_dir, folder, report):
    names = [r["image"] for r in report["images"]]
    assert names == sorted(str(p) for p in folder.glob("SYN_*.png"))
    assert "manifest" in report["class_names"]
    out = _official_outputs(run_dir, names)
    for i, r in enumerate(report["images"]):
        for family, ts in (("discrete", targets.DISCRETE_TARGETS), ("loss_groups", targets.GROUPS),
                           ("loss_flags", targets.FLAG_TARGETS)):
            for t in ts:
                e = r[family][t.name]
                words = schema.CLASS_NAMES[t.name] if family == "discrete" else ("not used", "used")
                assert list(e["probs"]) == list(words) == list(e["raw"])
                raw = np.asarray(out["probs"][t.name][i], np.float64)
                np.testing.assert_allclose(list(e["raw"].values()), raw, rtol=1e-5, atol=1e-6)
                probs = np.asarray(list(e["probs"].values()))
                assert abs(probs.sum() - 1) < 1e-5
                np.testing.assert_allclose(probs, raw / raw.sum(), rtol=1e-5, atol=1e-6)
                assert e["class"] == words[int(np.argmax(raw))] and e["class_id"] == int(np.argmax(raw))
                if family != "discrete":
                    assert e["used"] == (e["class"] == "used") and e["p_used"] == e["probs"]["used"]
        for j, t in enumerate(targets.CONTINUOUS_TARGETS):
            c = r["continuous"][t.name]
            x = float(out["continuous"][i, j])
            assert c["normalised"] == pytest.approx(x, abs=1e-6)
            lo, hi = COUNT_RANGES["min"][t.name], COUNT_RANGES["max"][t.name]
            value = lo + x * (hi - lo)
            assert c["value"] == pytest.approx(10 ** value if t.name == "parameters" else value, rel=1e-5)


def test_whole_set_is_the_majority_vote_and_the_mean(report):
    s = report["set"]
    assert s["num_images"] == len(report["images"]) == 5
    for family, ts in (("discrete", targets.DISCRETE_TARGETS), ("loss_flags", targets.FLAG_TARGETS),
                       ("loss_groups", targets.GROUPS)):
        for t in ts:
            decided = [r[family][t.name]["class"] for r in report["images"]]
            words = list(s[family][t.name]["mean_probs"])
            counts = [decided.count(w) for w in words]
            assert list(s[family][t.name]["votes"].values()) == counts
            assert s[family][t.name]["vote"] == words[int(np.argmax(counts))]  # ties: the lower id
            mean = np.mean([list(r[family][t.name]["probs"].values()) for r in report["images"]], axis=0)
            np.testing.assert_allclose(list(s[family][t.name]["mean_probs"].values()), mean, atol=2e-6)
    for t in targets.CONTINUOUS_TARGETS:
        mean = np.mean([r["continuous"][t.name]["normalised"] for r in report["images"]])
        assert s["continuous"][t.name]["normalised"] == pytest.approx(mean, abs=2e-6)


def test_skipped_files_are_listed_with_their_reason(folder, report):
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {str(folder / "broken.png"), str(folder / "notes.txt")}
    assert skipped[str(folder / "broken.png")].startswith("cannot decode")
    assert "not an image extension" in skipped[str(folder / "notes.txt")]


def _assert_same_decisions(got: dict, expected: dict) -> None:
    """Per target the same class, and probabilities within float32 rounding of the report's (a
    batch of other images sums in another order, so the 6th decimal may differ)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        g = got[name]
        assert (g["class"], g["class_id"]) == (e["class"], e["class_id"]), name
        for key in ("probs", "raw"):
            assert g[key].keys() == e[key].keys(), name
            np.testing.assert_allclose(list(g[key].values()), list(e[key].values()), atol=3e-6,
                                       err_msg=name)


def test_files_and_arrays_give_the_folder_results(run_dir, folder, report):
    files = sorted(folder.glob("SYN_*.png"))
    missing = folder / "nope.png"
    r = parse.parse(run_dir, [files[0], np.asarray(Image.open(files[1])), missing])
    for i in (0, 1):  # other batches: the same decisions, probabilities to float32 rounding
        _assert_same_decisions(r["images"][i]["discrete"], report["images"][i]["discrete"])
    assert r["images"][1]["image"] == "<image 1>"
    assert r["skipped"] == [{"path": str(missing), "reason": "does not exist"}]


def test_cli_json_markdown_and_the_predict_alias(run_dir, folder, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert parse.main(["--workdir", str(run_dir), "--folder", str(folder), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert len(saved["images"]) == 5 and len(saved["skipped"]) == 2 and "set" in saved
    err = capsys.readouterr().err
    assert f"skipped {folder / 'broken.png'}: cannot decode" in err
    md = tmp_path / "r.md"
    files = [str(p) for p in sorted(folder.glob("SYN_00_*.png"))]
    assert predict.main(["--workdir", str(run_dir), "--images", *files, "--out", str(md)]) == 0
    text = md.read_text()
    assert "## Whole set" in text and "| Up-sampling type |" in text
    assert files[0] in text and "transposed_conv" in text or "resize_conv" in text


def test_an_ensemble_is_the_mean_of_its_members_outputs(run_dir, folder, report, tmp_path_factory, capsys):
    other = write_tiny_run(tmp_path_factory.mktemp("parse_member"), "renet", manifest=True, seed=1)
    single = parse.parse(other, folder=folder)
    both = parse.parse([run_dir, other], folder=folder)
    assert both["ensemble_of"] == 2 and both["arch"] == ["adaparse", "renet"] and both["step"] == [0, 0]
    assert both["workdir"] == [report["workdir"], single["workdir"]]
    assert both["skipped"] == report["skipped"]
    for r, a, b in zip(both["images"], report["images"], single["images"], strict=True):
        assert r["image"] == a["image"] == b["image"]
        for family, ts in parse._FAMILIES:
            for t in ts:
                raw = (np.asarray(list(a[family][t.name]["raw"].values()))
                       + np.asarray(list(b[family][t.name]["raw"].values()))) / 2
                e = r[family][t.name]
                np.testing.assert_allclose(list(e["raw"].values()), raw, atol=2e-6)
                np.testing.assert_allclose(list(e["probs"].values()), raw / raw.sum(), atol=2e-6)
                assert e["class_id"] == int(np.argmax(raw))
        for t in targets.CONTINUOUS_TARGETS:
            mean = (a["continuous"][t.name]["normalised"] + b["continuous"][t.name]["normalised"]) / 2
            assert r["continuous"][t.name]["normalised"] == pytest.approx(mean, abs=2e-6)
    argv = ["--workdir", str(run_dir), "--workdir", str(other), "--folder", str(folder)]
    assert parse.main(argv + ["--format", "md"]) == 0
    text = capsys.readouterr().out
    assert "with an ensemble of 2 runs" in text and f"{single['workdir']} (step 0, renet)" in text
    _fails(capsys, argv + ["--step", "0"], "applies to one run")
    config = tiny_config("renet")  # a member that reads another image size
    config.model.image_size = 16
    config.data.dataset, config.data.cache = str(run_dir.parent / "dataset"), str(run_dir.parent / "cache")
    small = convert.write_run(config, init_variables(config), tmp_path_factory.mktemp("small") / "run")
    _fails(capsys, ["--workdir", str(run_dir), "--workdir", str(small), "--folder", str(folder)],
           "reads 16 px images", "the same size")


def test_dataset_without_class_names_gives_ids_and_says_so(tmp_path):
    run_dir = write_tiny_run(tmp_path, "renet", manifest=False)
    image = np.asarray(Image.open(tmp_path / "dataset" / "images" / "SYN_03" / "0000.png"))
    r = parse.parse(run_dir, [image])
    assert "records no class names" in r["class_names"]
    e = r["images"][0]["discrete"]["normalization"]
    assert list(e["probs"]) == ["class 0", "class 1", "class 2", "class 3"]
    assert "value" not in r["images"][0]["continuous"]["layers"]
    assert list(r["images"][0]["loss_flags"]["wgan"]["probs"]) == ["not used", "used"]


# ------------------------------------------------------------------------------------------------
# Bad input: one line each.


def _fails(capsys, argv, *expected):
    assert parse.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_bad_workdirs(run_dir, folder, tmp_path, capsys):
    _fails(capsys, ["--workdir", str(tmp_path / "missing"), "--folder", str(folder)],
           "missing", "no such run directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--workdir", str(tmp_path / "empty"), "--folder", str(folder)],
           "config.json does not exist")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(run_dir / "config.json", no_ckpt / "config.json")
    _fails(capsys, ["--workdir", str(no_ckpt), "--folder", str(folder)], "no checkpoint", str(no_ckpt))
    _fails(capsys, ["--workdir", str(run_dir), "--folder", str(folder), "--step", "7"],
           "no checkpoint step 7", "steps: [0]")


def test_bad_folders(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--workdir", str(run_dir), "--folder", str(tmp_path / "empty")],
           "holds no file with an image extension")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG not really")
    _fails(capsys, ["--workdir", str(run_dir), "--folder", str(tmp_path / "broken")],
           "no readable image", "a.png: cannot decode")
    _fails(capsys, ["--workdir", str(run_dir), "--folder", str(tmp_path / "absent")], "does not exist")
    _fails(capsys, ["--workdir", str(run_dir), str(tmp_path / "absent.png")],
           "no readable image", "absent.png: does not exist")
    assert parse.main(["--workdir", str(run_dir)]) == 2  # neither files nor a folder
    assert "give image files or --folder" in capsys.readouterr().err


@pytest.mark.parametrize("array, expected", [
    (np.full((32, 32, 3), 0.5, np.float32), "dtype float32; expected uint8 pixels 0-255, nothing is cast"),
    (np.zeros((32, 32, 3), np.uint16), "dtype uint16"),
    (np.zeros((3, 32, 32), np.uint8), "shape (3, 32, 32); expected [H, W, 3] (RGB, channels last) (channels first"),
    (np.zeros((32, 32), np.uint8), "shape (32, 32); expected [H, W, 3]"),
])
def test_bad_arrays_are_refused_not_cast(run_dir, array, expected):
    good = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(parse.ParseError) as e:
        parse.parse(run_dir, [good, array])
    assert str(e.value).startswith("image 1 has ") and expected in str(e.value)
