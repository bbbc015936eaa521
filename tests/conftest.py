"""Fixtures shared by the test modules."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole test session: the controller makes it before
# any test process starts, and the xdist workers and the subprocesses the tests spawn (train.py
# runs, demo runs, multi-device children) inherit it, so a program compiled by one process is
# read from disk by the others. Tests that need their own cache set the variable themselves.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="adaparse-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

# The tests compile at XLA's CPU backend optimisation level 0 (LLVM's -O0 for the generated
# loops; the HLO passes, and so the program, are the same). Most tests run tiny models once, so
# compiling is most of their time. Results agree with the default level to float32 rounding, not
# bit for bit (a tiny AdaParse's training loss and gradients: about 1e-7 relative), and every
# comparison inside the suite is between programs compiled alike. The product compiles at the
# default level (3); XLA_FLAGS=--xla_backend_optimization_level=3 tests at it. Spawned
# processes inherit the flag (train.py runs, multi-device children); the zoo's workers set their
# own XLA_FLAGS (`zoo.settings.WORKER_ENV`).
O0_FLAG = "--xla_backend_optimization_level=0"
if "PYTEST_XDIST_WORKER" not in os.environ and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {O0_FLAG}".strip()


def default_level_env() -> dict[str, str]:
    """This process's environment without the tests' optimisation-level flag: for a subprocess
    whose time is compute, not compiling (the full-size AdaParse parity run in float64 took 2.6x as long at -O0)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != O0_FLAG]
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}


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
