"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (reference files); tests that need it skip without it."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"{path} is not present")
    return path


# `make test` runs the suite on two processes (pytest-xdist, --dist loadgroup). Each module is one
# group, so its module- and session-scoped fixtures (a built zoo, compiled steps) are made once;
# the modules that read the tiny training runs of train_runs.py share one group, so those runs are
# trained once.
TINY_RUNS_MODULES = {"test_train_e2e", "test_eval", "test_scoring", "test_diagnose"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(str(item.fspath)).stem
        item.add_marker(pytest.mark.xdist_group("tiny_runs" if module in TINY_RUNS_MODULES else module))
