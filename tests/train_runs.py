"""Tiny training runs shared by test_train_e2e.py and test_eval.py (built once per test process).

`tiny_runs(tmp_path_factory)` writes a generated dataset (8 generators, 16 images of 32x32 each,
2 test splits of 2 generators), decodes it, and runs `python train.py` with configs/tiny.py (tiny
RE-Net) as the user would, in subprocesses sharing one persistent XLA compilation cache:

  A  split 1, 2 epochs, uninterrupted
  B  split 1, the same config, trained by `train.train` with a hook that SIGKILLs the process right
     after dispatching step 7 (as a preemption would: no cleanup runs), then `train.py` to the end
  C  split 2, stopped by max_steps=4, then rerun to the end

Each epoch has 5 steps (5 training generators x 16 images / batch 16; one generator is held out for
validation), checkpoints every 3 steps and at epoch ends, keeping the last one and the best one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adaparse_jax import train as training
from adaparse_jax.data import cache as cache_lib
from adaparse_jax.data import re116, synthetic

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.py:renet,synthetic"
CRASH_STEP = 7
STEPS_PER_EPOCH = 5
_RUNS: dict | None = None


def train(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


# What `train.py` does, with a hook that kills the process after the call reaching step `crash`.
CRASH_SCRIPT = """
import os, signal, sys
from adaparse_jax import train as training
crash, workdir, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]

def kill(prev, step):
    if prev < crash <= step:
        os.kill(os.getpid(), signal.SIGKILL)

training.train(training.load_config(overrides[1], overrides[2:]), workdir, hooks=[kill])
"""


def write_tiny_dataset(root: Path) -> Path:
    """The tiny runs' dataset in `root`/dataset, decoded into `root`/cache; its dataset.json path."""
    ds_path = synthetic.write_dataset(root / "dataset", num_generators=8, images_per_generator=16,
                                      num_splits=2, test_per_split=2)
    dataset = re116.load_dataset(ds_path)
    cache_lib.prepare_dataset(dataset, root / "cache", settings=cache_lib.PrepareSettings(size=32),
                              workers=1, progress=False)
    return ds_path


def tiny_runs(tmp_path_factory) -> dict:
    global _RUNS
    if _RUNS is not None:
        return _RUNS
    root = tmp_path_factory.mktemp("tiny_runs")
    ds_path = write_tiny_dataset(root)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    common = ["--config", CONFIG, f"--config.data.dataset={ds_path.parent}",
              f"--config.data.cache={root / 'cache'}", "--config.progress=False",
              "--config.num_epochs=2", "--config.checkpoint_every_steps=3",
              "--config.keep_checkpoints=1", "--config.log_every_steps=1"]
    runs = {"root": root, "dataset": ds_path.parent, "cache": root / "cache", "env": env,
            "common": common, "A": root / "A", "B": root / "B", "C": root / "C"}
    runs["A_out"] = train(common + [f"--workdir={runs['A']}"], env)
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(CRASH_STEP), str(runs["B"]), *common],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    runs["B_crash"] = {
        "returncode": crashed.returncode,
        "checkpoints": sorted(int(p.name) for p in (runs["B"] / "checkpoints").iterdir() if p.name.isdigit()),
        "metrics": training.read_metrics(runs["B"]),
    }
    runs["B_out"] = train(common + [f"--workdir={runs['B']}"], env)
    split2 = common + ["--config.split=2", f"--workdir={runs['C']}"]
    runs["C_stopped"] = train(split2 + ["--config.max_steps=4"], env)
    runs["C_stopped_checkpoints"] = sorted(
        int(p.name) for p in (runs["C"] / "checkpoints").iterdir() if p.name.isdigit())
    runs["C_eval_after_stop"] = (runs["C"] / "eval").exists()
    runs["C_out"] = train(split2, env)
    _RUNS = runs
    return runs
