"""Training across processes with JAX's multi-process runtime (config.distributed).

Two `python train.py` processes on localhost, one CPU device each (cross-process collectives over
gloo), train the tiny RE-Net of the tiny runs' dataset (`train_runs.write_tiny_dataset`: 32 px,
5 steps of batch 16, a checkpoint at step 3, validation and a checkpoint at the epoch end). Beside
them, one process with 2 devices (the same 1-D 'data' mesh: 8 images per device) trains the same
config. The test checks that

  (a) every loss term of every step, and the validation scores, equal the one-process run's (each
      process read only its 8 rows of every global batch; the global batches are the same);
  (b) the checkpoint the two processes wrote restores in this (one-device) process, to the
      one-process run's state;
  and process 0 alone wrote the workdir's files and printed the evaluation command.

A resume in two processes (every process restoring the step-3 checkpoint, then the same losses as
the uninterrupted run) is not tested here: it costs two more processes' start and compile (about
30 s of CPU); it was checked by hand. The three processes take about 70 s of CPU (40 s of wall time
on 2 idle cores).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import train_runs

from adaparse_jax import checkpointing, models
from adaparse_jax import runs as runs_lib
from adaparse_jax import train as training

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def _wait(procs: dict[str, tuple[subprocess.Popen, Path]]) -> dict[str, str]:
    """Wait for every process; when one fails (or time runs out) kill the rest, which would
    otherwise wait for it at the next collective. Returns each one's output."""
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while failed is None and any(p.poll() is None for p, _ in procs.values()):
        failed = next((n for n, (p, _) in procs.items() if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    failed = failed or next((n for n, (p, _) in procs.items() if p.returncode != 0), None)
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    logs = {n: log.read_text() for n, (_, log) in procs.items()}
    if failed is not None:
        raise AssertionError(f"{failed} failed:\n" + "\n".join(
            f"--- {n} (exit {p.returncode}):\n{logs[n][-3000:]}" for n, (p, _) in procs.items()))
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multihost")
    ds_path = train_runs.write_tiny_dataset(root)
    common = ["--config", train_runs.CONFIG, f"--config.data.dataset={ds_path.parent}",
              f"--config.data.cache={root / 'cache'}", "--config.progress=False",
              "--config.num_epochs=1", "--config.checkpoint_every_steps=3",
              "--config.keep_checkpoints=1", "--config.log_every_steps=1", "--config.tensorboard=False"]
    env = {k: v for k, v in os.environ.items() if k != training.DISTRIBUTED_ENV}
    # The session's XLA flags (conftest.py) without any device count: one CPU device per process.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    one_env = dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2".strip())
    port = _free_port()
    procs = {}
    for i in range(2):
        log = root / f"process{i}.log"
        procs[f"process{i}"] = (_start(common + [
            f"--workdir={root / 'mp'}", f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"], env, log), log)
    procs["one"] = (_start(common + [f"--workdir={root / 'one'}", "--config.eval_at_end=False"], one_env,
                           root / "one.log"), root / "one.log")
    t0 = time.monotonic()
    logs = _wait(procs)
    print(f"two processes and the one-process run: {time.monotonic() - t0:.1f} s")
    return {"root": root, "mp": root / "mp", "one": root / "one", "logs": logs}


def _by_step(records: list[dict], prefix: str) -> dict[int, dict]:
    out = {}
    for r in records:
        values = {k: v for k, v in r.items() if k.startswith(prefix)}
        if values:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = values
    return out


def test_losses_equal_one_process_with_two_devices(runs):
    mp, one = training.read_metrics(runs["mp"]), training.read_metrics(runs["one"])
    for prefix in ("train/loss/", "val/"):
        a, b = _by_step(mp, prefix), _by_step(one, prefix)
        assert sorted(a) == sorted(b) == (list(range(1, STEPS + 1)) if prefix == "train/loss/" else [STEPS])
        for step in a:
            assert a[step].keys() == b[step].keys()
            for k in a[step]:
                np.testing.assert_allclose(a[step][k], b[step][k], rtol=1e-6, atol=1e-7,
                                           err_msg=f"{k} at step {step}")


def test_process_zero_alone_writes_the_workdir_files(runs):
    logs, mp = runs["logs"], runs["mp"]
    assert "RE-Net: finished at step 5 of 5" in logs["process0"] and "(2 processes)" in logs["process0"]
    assert f"python eval.py --workdir {mp} --out {mp}/results" in logs["process0"]
    assert "finished at step" not in logs["process1"] and "python eval.py" not in logs["process1"]
    assert not (mp / "eval").exists()  # evaluation is left to a single process
    saved = training.load_saved_config(mp)
    assert saved.distributed.process_id == 0 and saved.distributed.num_processes == 2
    assert (mp / "selection.json").is_file() and (mp / "train.log").read_text().count("compiled in") == 1


def test_checkpoint_of_two_processes_restores_in_one(runs):
    config = training.load_saved_config(runs["mp"])
    model = models.build_model(config.model)
    tx = training.make_optimizer(config)
    size = config.model.image_size
    abstract = training.state_shapes(model, tx, (size, size, 3))
    states = {}
    for name in ("mp", "one"):
        with checkpointing.Checkpointer(runs[name] / "checkpoints") as ckpt:
            assert ckpt.latest_step() == STEPS
            states[name], loader, meta = ckpt.restore(abstract, model_config=config.model.to_dict())
        assert loader["epoch"] == 1 and loader["step"] == 0 and meta["epoch"] == 1
    mp, one = (jax.tree_util.tree_leaves_with_path(states[n]) for n in ("mp", "one"))
    for (path, a), (_, b) in zip(mp, one, strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    loaded = runs_lib.load(runs["mp"])  # what eval.py reads, in one process
    assert loaded.step == STEPS
    for a, b in zip(jax.tree.leaves(loaded.variables["params"]), jax.tree.leaves(states["mp"].params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
