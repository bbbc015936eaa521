"""Official state dicts -> Flax variables, and the parity command on the reference files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import default_level_env, skip_or_fail

from adaparse_jax import convert, models, parity, targets

# ------------------------------------------------------------------------------------------------
# Layouts, checked against NumPy versions of the torch operations.


def torch_conv2d(x, w, b, padding):
    """NumPy torch.nn.functional.conv2d: x [N, C, H, W], w [O, C, kh, kw] (cross-correlation)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    o, _, kh, kw = w.shape
    h, wd = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    out = np.zeros((x.shape[0], o, h, wd))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


@pytest.mark.parametrize("padding", [1, 2])
def test_conv_layout(padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    kernel = convert.to_flax_layout(w, convert.Entry("w", "params", ("kernel",), "conv"))
    y = nn.Conv(4, (3, 3), padding=padding).apply(
        {"params": {"kernel": kernel, "bias": b}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), torch_conv2d(x, w, b, padding),
                               rtol=1e-5, atol=1e-5)


def test_linear_and_flattened_linear_layouts():
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    x = rng.standard_normal((3, 7))
    kernel = convert.to_flax_layout(w, convert.Entry("w", "params", ("kernel",), "linear"))
    y = nn.Dense(5).apply({"params": {"kernel": kernel, "bias": b}}, x)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)

    # A linear layer after a flattened [C=4, H=3, W=2] map: torch flattens NCHW, Flax NHWC.
    fmap = rng.standard_normal((3, 4, 3, 2))
    w = rng.standard_normal((5, 24))
    entry = convert.Entry("w", "params", ("kernel",), "flat", channels=4)
    kernel = convert.to_flax_layout(w, entry)
    y = nn.Dense(5).apply({"params": {"kernel": kernel, "bias": b}},
                          fmap.transpose(0, 2, 3, 1).reshape(3, -1))
    np.testing.assert_allclose(y, fmap.reshape(3, -1) @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(convert.to_torch_layout(kernel, entry), w)


def test_official_head_names_follow_the_targets_table():
    names = convert.official_head_names()
    assert len(names) == targets.NUM_HEADS + len(targets.GROUPS)
    assert names["fc8_1"] == "layers" and names["fc8_9"] == "parameters"
    assert names["fc8_10"] == "normalization" and names["fc8_15"] == "downsampling"
    assert [names[f"fc9_{k}"] for k in (1, 2, 3)] == ["loss_group1", "loss_group2", "loss_group3"]
    assert names["fc10_1"] == "l1" and names["fc10_10"] == "ce"


# ------------------------------------------------------------------------------------------------
# Round trips and errors.


def random_state(plan, cfg, seed=0):
    """A random state dict with the official names and torch shapes of a plan."""
    rng = np.random.default_rng(seed)
    shapes = convert._expected_shapes(cfg, plan)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("arch", ["adaparse", "renet"])
def test_tiny_round_trip(arch):
    cfg = models.model_config(arch, size="tiny")
    if arch == "adaparse":
        fen, par = random_state(convert.fen_plan(cfg), cfg), random_state(convert.parser_plan(cfg), cfg, 1)
        variables = convert.adaparse_variables(fen, par, cfg)
        state, plan = {**fen, **par}, convert.fen_plan(cfg) + convert.parser_plan(cfg)
    else:
        state = random_state(convert.renet_fen_plan(cfg), cfg)
        variables, plan = convert.renet_fen_variables(state, cfg), convert.renet_fen_plan(cfg)
    shapes = models.variable_shapes(cfg)
    if arch == "renet":
        shapes = {k: {"fen": v["fen"]} for k, v in shapes.items()}
    assert (jax.tree_util.tree_map(np.shape, variables)
            == jax.tree_util.tree_map(lambda s: s.shape, shapes))
    back = convert.to_torch(variables, plan)
    assert list(back) == list(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name], err_msg=name)


def test_full_size_plans_give_the_official_names_and_shapes(shared_dir):
    """Every official tensor (in state_dict order) has a plan entry whose Flax array has its shape.

    (The values' round trip through the same code is checked at tiny size above.)
    """
    ref = json.loads((shared_dir / "reference" / "official_state_dicts.json").read_text())
    cases = [("adaparse_fen", "adaparse", convert.fen_plan()),
             ("adaparse_parser", "adaparse", convert.parser_plan()),
             ("renet_fen", "renet", convert.renet_fen_plan())]
    for key, arch, plan in cases:
        official = [(n, tuple(s)) for n, s, _ in ref[key] if not n.endswith("num_batches_tracked")]
        shapes = convert._expected_shapes(models.model_config(arch), plan)
        assert list(shapes.items()) == official, key
        params = sum(int(np.prod(s)) for (n, s), e in zip(official, plan) if e.collection == "params")
        assert params == ref[f"{key}_num_params"], key


def test_bad_state_dict_lists_every_problem():
    cfg = models.model_config("renet", size="tiny")
    state = random_state(convert.renet_fen_plan(cfg), cfg)
    state["layers.1.1.num_batches_tracked"] = np.array(0)  # accepted and dropped
    state["layers.99.weight"] = np.zeros(3)
    del state["layers.2.1.running_var"]
    state["layers.0.0.weight"] = np.zeros((8, 3, 5, 5))
    with pytest.raises(ValueError) as e:
        convert.renet_fen_variables(state, cfg)
    msg = str(e.value)
    assert "layers.99.weight" in msg and "layers.2.1.running_var" in msg
    assert "layers.0.0.weight: (8, 3, 5, 5), expected (8, 3, 3, 3)" in msg
    assert "num_batches_tracked" not in msg


def test_ablated_configs_have_no_official_weights():
    cfg = models.model_config("adaparse")
    cfg.fusion = "add"
    with pytest.raises(ValueError, match="fusion='concat'"):
        convert.fen_plan(cfg)


def test_checkpoint_loader_without_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[torch\]"):
        convert.load_official_checkpoint(tmp_path / "116_model_19.pickle")


def test_checkpoint_loader_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = models.model_config("adaparse", size="tiny")
    fen = random_state(convert.fen_plan(cfg), cfg)
    par = random_state(convert.parser_plan(cfg), cfg, 1)
    path = tmp_path / "116_model_0.pickle"
    state = {k: torch.from_numpy(v) for k, v in fen.items()}
    state["layers.1.1.num_batches_tracked"] = torch.tensor(7)
    torch.save({"state_dict_cnn": state, "optimizer_1": {},
                "state_dict_class": {k: torch.from_numpy(v) for k, v in par.items()}}, path)
    variables = convert.load_official_checkpoint(path, "adaparse", cfg)
    back = convert.to_torch(variables, convert.fen_plan(cfg) + convert.parser_plan(cfg))
    for name, value in {**fen, **par}.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    torch.save({"state_dict_cnn": state}, path)
    with pytest.raises(ValueError, match="state_dict_class"):
        convert.load_official_checkpoint(path, "adaparse", cfg)


# ------------------------------------------------------------------------------------------------
# The parity command.


def test_rebuild_rule():
    entries = [("a.weight", [3, 2, 3, 3], "float32"), ("a.bias", [3], "float32"),
               ("bn.weight", [3], "float32"), ("bn.running_mean", [3], "float32"),
               ("bn.num_batches_tracked", [], "int64")]
    out = parity.rebuild_state_dict(entries, 7, {"bn.running_mean": np.ones(3)})
    rng = np.random.default_rng([7, 0])
    np.testing.assert_array_equal(out["a.weight"], (rng.standard_normal((3, 2, 3, 3))
                                                    * np.sqrt(2 / 18)).astype(np.float32))
    np.testing.assert_array_equal(out["a.bias"], (0.05 * np.random.default_rng([7, 1]).standard_normal(3))
                                  .astype(np.float32))
    np.testing.assert_array_equal(out["bn.weight"], np.random.default_rng([7, 2]).uniform(0.8, 1.2, 3)
                                  .astype(np.float32))
    np.testing.assert_array_equal(out["bn.running_mean"], np.ones(3, np.float32))
    assert out["bn.num_batches_tracked"] == 0
    with pytest.raises(ValueError, match="bn.running_mean"):
        parity.rebuild_state_dict(entries, 7, {})


def test_judge_rules():
    ok = parity.Row("a", 5e-5)
    rounding = parity.Row("b", 2e-3, err64=9e-4, noise=1.5e-3)
    mismatch = parity.Row("c", 2e-2, err64=2e-2, noise=1e-3)
    assert parity.judge([ok, rounding]) == []
    assert [ok.verdict, rounding.verdict] == ["ok", "ok (float32 rounding)"]
    assert parity.judge([ok, rounding], strict=True) and rounding.verdict == "FAIL"
    problems = parity.judge([ok, rounding, mismatch])
    assert mismatch.verdict == "FAIL" and "c" in problems[-1]
    # A float32 path much noisier than the reference's own rounding fails everything it explains.
    noisy = parity.Row("d", 3e-2, err64=9e-4, noise=3e-2)
    assert parity.judge([noisy]) and noisy.verdict == "FAIL"
    assert parity.judge([parity.Row("e", float("inf"))])  # an array the package does not produce


def parity_file(shared_dir, name):
    path = shared_dir / "reference" / "parity" / name
    if not path.is_file():
        skip_or_fail(f"{path} not found")
    return path


def test_renet_parity_passes_strictly(shared_dir, capsys):
    path = parity_file(shared_dir, "renet_parity_seed1000.npz")
    assert parity.main([str(path), "--strict"]) == 0
    out = capsys.readouterr().out
    with np.load(path) as z:
        outputs = [k for k in z.files if k.startswith(("eval/", "trainbn/"))]
    assert len(outputs) == 14 and all(k in out for k in outputs)
    assert "tolerance 0.0001: ok" in out


def test_parity_detects_a_wrong_reference(shared_dir, tmp_path, capsys):
    path = parity_file(shared_dir, "renet_parity_seed1000.npz")
    data = dict(np.load(path))
    data["eval/fen/fingerprint"] = data["eval/fen/fingerprint"] * 1.001
    (tmp_path / "parity").mkdir()
    bad = tmp_path / "parity" / "renet.npz"
    np.savez(bad, **data)
    with pytest.raises(FileNotFoundError, match="state-dict"):
        parity.main([str(bad)])
    shutil.copy(shared_dir / "reference" / "official_state_dicts.json", tmp_path)
    assert parity.main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "eval/fen/fingerprint " in out and "FAIL" in out


@pytest.mark.slow
def test_adaparse_parity_passes(shared_dir):
    """Full-size AdaParse on CPU: about a minute (float32, then float64 for the allowance), as the
    command line in a process compiled at XLA's default level (conftest.default_level_env)."""
    path = parity_file(shared_dir, "adaparse_parity_seed1000.npz")
    done = subprocess.run([sys.executable, "-m", "adaparse_jax.parity", str(path)], env=default_level_env(),
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    with np.load(path) as z:
        outputs = [k for k in z.files if k.startswith(("eval/", "trainbn/"))]
    assert len(outputs) == 79 and all(k in out for k in outputs)
    assert "FAIL" not in out
    # The parser and loss terms, fed the file's own fingerprints, hold the tolerance itself.
    staged = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
              if line.startswith(parity.STAGED)}
    expected = {parity.STAGED + k for k in outputs if k.startswith(("eval/parser/", "trainbn/parser/"))
                or k.startswith("trainbn/loss/")}
    assert set(staged) == expected and max(staged.values()) <= 1e-4


class _RunsCode:
    """Unpickling this calls os.system: what a malicious "checkpoint" would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"state_dict_cnn": {"w": _RunsCode(marker)}, "state_dict_class": {}}))
    with pytest.raises(convert.UnsafeCheckpointError, match=r"refusing to open .*evil\.pickle: its pickle "
                                                             r"imports (posix|os|nt)\.system"):
        convert.load_official_checkpoint(path)  # refused with or without torch installed
    assert not marker.exists()


def test_torch_saved_state_dicts_pass_and_torch_saved_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.pickle"
    torch.save({"state_dict_cnn": {"w": torch.zeros(2)}}, good)
    convert.check_pickle_imports(good)  # tensors and dicts only
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pickle"
    torch.save({"state_dict_cnn": {"w": _RunsCode(marker)}}, evil)
    with pytest.raises(convert.UnsafeCheckpointError, match="would run code"):
        convert.load_official_checkpoint(evil, arch="renet")
    assert not marker.exists()
