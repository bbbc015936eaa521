"""Fixtures shared by the test modules."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole session: the xdist workers and the child
# processes the tests start (train.py runs, the demo, multi-process training) inherit it, so a
# program compiled once (the tiny models' steps recur across modules) is read back elsewhere.
# The controlling process sets it before its workers start and removes it at the end; a cache
# dir set by the caller is kept and used as it is.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="adaparse-jax-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose inputs are missing; under CI (CI=true) fail instead, so a CI run that lost
    its reference files cannot pass by skipping."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (reference files); tests that need it skip without it, and
    fail under CI=true."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        skip_or_fail(f"{path} is not present")
    return path


# `make test` runs the suite on two processes (pytest-xdist, --dist loadgroup). Each module is one
# group, so its module- and session-scoped fixtures (a built zoo, compiled steps) are made once;
# the modules that read the tiny training runs of train_runs.py share one group, so those runs are
# trained once.
TINY_RUNS_MODULES = {"test_train_e2e", "test_eval", "test_scoring", "test_runs", "test_forensics",
                     "test_diagnose_cli"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (else no grouping)
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(str(item.fspath)).stem
        item.add_marker(pytest.mark.xdist_group("tiny_runs" if module in TINY_RUNS_MODULES else module))


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE and not hasattr(config, "workerinput"):  # the process that made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
