"""`python -m adaparse_jax.diagnose` on the tiny training runs (train_runs.py) and on a fresh
initialisation: Markdown and JSON, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import train_runs

from adaparse_jax import diagnose, targets
from adaparse_jax import train as training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_runs.tiny_runs(tmp_path_factory)


def test_cli_writes_markdown_and_json_for_a_checkpoint(runs, capsys):
    workdir = runs["A"]
    assert diagnose.main(["--workdir", str(workdir), "--images", "32"]) == 0
    printed = capsys.readouterr().out
    out = workdir / "diagnose"
    report = json.loads((out / diagnose.JSON).read_text())
    assert (out / diagnose.MARKDOWN).read_text() in printed
    assert report["source"]["arch"] == "renet" and report["groups"] == ["fen", "parser"]
    assert report["source"]["images"] == 32 and report["source"]["step"] > 0
    assert report["adam"]["available"] and report["adam"]["count"] == report["source"]["step"]
    assert set(report["adam"]["groups"]) == {"fen", "parser"}
    assert report["gradients"][diagnose.CONSTRAINTS]["parser"] == 0.0
    assert set(report["probe"]) == {t.name for t in targets.DISCRETE_TARGETS}
    assert "parser/fc3" in report["activations"]
    for section in ("## Loss terms", "## Adam's effective step ratio", "## Activations", "## Probe"):
        assert section in printed


def test_cli_fresh_initialisation_reports_no_adam_state(runs, tmp_path, capsys):
    out = tmp_path / "init"
    assert diagnose.main(["--config", train_runs.CONFIG, "--dataset", str(runs["dataset"]),
                          f"--config.data.cache={runs['cache']}", "--config.loss.constraint_scale=0.01",
                          "--images", "16", "--out", str(out)]) == 0
    report = json.loads((out / diagnose.JSON).read_text())
    assert report["source"]["step"] == 0 and not report["adam"]["available"]
    assert report["source"]["constraint_factor"] == pytest.approx(0.01)
    assert "Not available: fresh initialisation" in capsys.readouterr().out


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    def error(args):
        assert diagnose.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "does not exist" in error(["--workdir", str(tmp_path / "nope")])
    assert "no checkpoint step 999" in error(["--workdir", str(runs["A"]), "--step", "999"])
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(runs["A"] / training.CONFIG_JSON, empty / training.CONFIG_JSON)
    assert "no checkpoint" in error(["--workdir", str(empty)])
    assert "--out is required" in error(["--config", train_runs.CONFIG])
