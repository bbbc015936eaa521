"""Train AdaParse or RE-Net (or resume a run) and evaluate it on its test split.

  python train.py --config configs/re116.py --workdir runs/re116_s1 --config.split=1
  python train.py --config configs/tiny.py --workdir runs/tiny --config.num_epochs=3

Overrides: any config field, `--config.<field>=<value>` (e.g. --config.model.fusion=add,
--config.random_gt=True); an unknown field is an error that lists the valid ones. Rerunning the
same command in the same workdir resumes from its last checkpoint. Everything else lives in
`adaparse_jax.train` (the training loop, `train.train`) and `adaparse_jax.evaluation.evaluate_run` (the
selected checkpoint on the split's test generators, when training finished and
config.eval_at_end).

Several hosts (config.distributed or ADAPARSE_DISTRIBUTED=auto; README "Several hosts"): start this
same command once per host. The test evaluation is then not run in process: it is a single-process
job (one device restores the selected checkpoint), and in the multi-process runtime every Orbax
read is a collective of all processes. Process 0 prints the `eval.py` command that does it.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (a Python file with get_config(arg)); "
                                "`path:arg` passes arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, evaluation.")


def _config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with unknown config fields reported as a clear error (exit code 2)."""
    from adaparse_jax import train as training

    path = _config_path(argv)
    try:
        if path is not None:
            training.check_overrides(training.load_config(path), argv[1:])
        rest = FLAGS(argv)
    except (training.ConfigError, flags.Error) as e:
        print(f"error: {e}\nusage: python train.py --config CONFIG.py --workdir DIR "
              "[--config.<field>=<value> ...]", file=sys.stderr)
        sys.exit(2)
    missing = [f"--{n}" for n in ("config", "workdir") if getattr(FLAGS, n) is None]
    if missing:
        print(f"error: {' and '.join(missing)} required\nusage: python train.py --config CONFIG.py "
              "--workdir DIR [--config.<field>=<value> ...]", file=sys.stderr)
        sys.exit(2)
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import logging

    from absl import logging as absl_logging

    from adaparse_jax import checkpointing, evaluation
    from adaparse_jax import train as training

    # This program's own progress at INFO; the libraries' (Orbax, grain) from WARNING up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("adaparse_jax")
    ours.setLevel(logging.INFO)
    ours.addHandler(handler)
    ours.propagate = False
    try:
        summary = training.train(FLAGS.config, FLAGS.workdir)
    except (training.ConfigError, checkpointing.CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except training.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    import jax

    state = "finished" if summary["finished"] else "stopped"
    processes = jax.process_count()
    if processes > 1 and jax.process_index() != 0:
        return
    print(f"{summary['label']}: {state} at step {summary['step']} of {summary['total_steps']} "
          f"in {summary['workdir']}" + (f" ({processes} processes)" if processes > 1 else ""))
    if summary["finished"] and FLAGS.config.eval_at_end and processes > 1:
        print("test evaluation runs in one process (not in this multi-process job): python eval.py "
              f"--workdir {summary['workdir']} --out {summary['workdir']}/results")
    elif summary["finished"] and FLAGS.config.eval_at_end:
        result = evaluation.evaluate_run(summary["workdir"])
        print(f"test generators, checkpoint step {result['step']} ({result['selection']}): "
              + evaluation.headline(result["metrics"]))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
