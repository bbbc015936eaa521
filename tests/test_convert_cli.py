"""python -m adaparse_jax.convert: official state dicts -> a run workdir that load / parse / eval read.

The round trip runs without torch (state dicts of NumPy arrays with the official names and torch
shapes, tiny sizes); `test_convert_cli_with_torch` needs torch (`pip install -e .[torch]`) and skips
without it."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from parse_runs import SIZE, tiny_config, write_dataset

import adaparse_jax
from adaparse_jax import checkpointing, convert, evaluation, models, parse


def official_state(plan, cfg, seed):
    """A random state dict with the official names (plan order) and torch shapes."""
    rng = np.random.default_rng(seed)
    shapes = convert._expected_shapes(cfg, plan)
    return {n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


def adaparse_states(cfg):
    return (official_state(convert.fen_plan(cfg), cfg, 0), official_state(convert.parser_plan(cfg), cfg, 1))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_data")
    write_dataset(root, manifest=False)
    return root


def _config(arch, data_root):
    config = tiny_config(arch)
    config.data.dataset = str(data_root / "dataset")
    config.data.cache = str(data_root / "cache")
    return config


def test_adaparse_round_trip_without_torch(data_root, tmp_path):
    config = _config("adaparse", data_root)
    fen, par = adaparse_states(config.model)
    variables = convert.adaparse_variables(fen, par, config.model)
    out, untrained = convert.official_run(variables, "adaparse", config, tmp_path / "run", source="x.pickle")
    assert untrained == ()
    run = adaparse_jax.load(out)
    assert run.step == 0
    back = convert.to_torch(run.variables, convert.fen_plan(config.model) + convert.parser_plan(config.model))
    for name, value in {**fen, **par}.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    images = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    from adaparse_jax.data import pipeline

    model = models.build_model(config.model)
    expected = jax.jit(lambda v, x: model.apply(v, pipeline.normalize(x), train=False))(variables, images)
    got = jax.jit(run.apply)(run.variables, images)
    np.testing.assert_array_equal(got["continuous"], expected["continuous"])
    for name in expected["probs"]:
        np.testing.assert_array_equal(got["probs"][name], expected["probs"][name])
    report = parse.parse(out, list(images))  # parse accepts the converted workdir
    assert len(report["images"]) == 3 and "warning" not in report
    assert evaluation.evaluate_run(out)["step"] == 0  # and so does the evaluation


def test_renet_fen_only_parser_is_recorded_untrained(data_root, tmp_path, capsys):
    config = _config("renet", data_root)
    state = official_state(convert.renet_fen_plan(config.model), config.model, 3)
    variables = convert.renet_fen_variables(state, config.model)
    out, untrained = convert.official_run(variables, "renet", config, tmp_path / "run")
    assert untrained == ("parser",)
    run = adaparse_jax.load(out)
    back = convert.to_torch(run.variables, convert.renet_fen_plan(config.model))
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert "parser" in run.variables["params"]
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(checkpointing.UntrainedModelError, match="parser is untrained .*only the FEN"):
        parse.parse(out, [image])
    with pytest.raises(checkpointing.UntrainedModelError, match="--allow-untrained"):
        evaluation.evaluate_run(out)
    assert parse.main(["--workdir", str(out), "--folder", str(data_root / "dataset" / "images" / "SYN_00")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "untrained" in err
    report = parse.parse(out, [image], allow_untrained=True)
    assert "parser is untrained" in report["warning"]
    assert evaluation.evaluate_run(out, allow_untrained=True)["step"] == 0


def test_write_run_refuses_a_used_directory_and_wrong_variables(data_root, tmp_path):
    config = _config("renet", data_root)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(ValueError, match="already holds files"):
        convert.write_run(config, {}, tmp_path / "used")
    other = _config("adaparse", data_root)
    fen, par = adaparse_states(other.model)
    with pytest.raises(ValueError, match="do not fit config.model"):
        convert.write_run(config, convert.adaparse_variables(fen, par, other.model), tmp_path / "new")


def _config_file(tmp_path, arch, data_root):
    path = tmp_path / "tiny_official.py"
    path.write_text(
        "from adaparse_jax import models\n"
        "from adaparse_jax import train as training\n"
        "def get_config(arg=None):\n"
        "    c = training.default_config()\n"
        f"    c.model = models.model_config({arch!r}, size='tiny')\n"
        f"    c.data.dataset = {str(data_root / 'dataset')!r}\n"
        f"    c.data.cache = {str(data_root / 'cache')!r}\n"
        "    return c\n")
    return path


def test_convert_cli_without_torch(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert convert.main(["--official", str(tmp_path / "a.pickle"), "--arch", "renet",
                         "--out", str(tmp_path / "run")]) == 2
    assert "pip install -e .[torch]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_convert_cli_with_torch(data_root, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    cfg = tiny_config("renet").model
    state = official_state(convert.renet_fen_plan(cfg), cfg, 4)
    path = tmp_path / "renet.pickle"
    torch.save({"state_dict_cnn": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    out = tmp_path / "run"
    assert convert.main(["--official", str(path), "--arch", "renet", "--out", str(out),
                         "--config", str(_config_file(tmp_path, "renet", data_root)),
                         "--config.split=2"]) == 0
    text = capsys.readouterr().out
    assert "missing from the official file: the parser" in text and "--allow-untrained" in text
    run = adaparse_jax.load(out)
    assert run.config.split == 2
    back = convert.to_torch(run.variables, convert.renet_fen_plan(cfg))
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
