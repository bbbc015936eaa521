"""Why a run learns what it learns: gradient balance, Adam's damping, dead units, fingerprint probe.

Command line of `python -m adaparse_jax.diagnose` (the package docstring describes the report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from adaparse_jax import spectral, stats
from adaparse_jax.diagnose import fingerprints
from adaparse_jax.diagnose.report import diagnose, markdown, write_report
from adaparse_jax.diagnose.subject import DiagnoseError, initialise, load_checkpoint
from adaparse_jax.zoo import probe as zoo_probe


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adaparse_jax.diagnose", allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides (--config.<field>=<value>) go with --config.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run directory: diagnose its checkpoint")
    src.add_argument("--config", help="CONFIG_FILE[:arg]: diagnose a fresh initialisation")
    src.add_argument("--zoo", help="a zoo: probe the fingerprints of its k-fold --runs on held-out "
                                   "generators beside its images (`diagnose.fingerprints`)")
    p.add_argument("--runs", nargs="+", default=(),
                   help="with --zoo: one run per fold trained on it (workdirs or glob patterns)")
    p.add_argument("--channels", default="mean", choices=spectral.CHANNELS,
                   help="with --zoo: features of the channel mean (default) or of each colour channel")
    p.add_argument("--decide", default="mean", choices=zoo_probe.DECISIONS,
                   help="with --zoo: a held-out generator's class by its images' mean probability "
                        "(default) or the majority vote of their argmaxes")
    p.add_argument("--n-resamples", type=int, default=stats.N_RESAMPLES,
                   help="with --zoo: label permutations for the p-values")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: the run's selected checkpoint)")
    p.add_argument("--dataset", default=None,
                   help="with --config: a dataset directory or dataset.json (e.g. a zoo)")
    p.add_argument("--images", type=int, default=64, help="training images in the sample (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the dropout keys")
    p.add_argument("--out", default=None,
                   help="output directory (default <workdir>/diagnose[_step<N>]; required with --config)")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    try:
        if unknown:
            raise DiagnoseError(f"unrecognised arguments: {' '.join(unknown)}")
        if args.zoo is not None:
            return _fingerprints(args, overrides)
        if args.runs:
            raise DiagnoseError("--runs goes with --zoo")
        if args.workdir is not None:
            if overrides or args.dataset:
                raise DiagnoseError("--config.<field> overrides and --dataset go with --config, "
                                    "not --workdir (a run is diagnosed with its own config)")
            subject = load_checkpoint(args.workdir, args.step)
            out = args.out or Path(subject.source["workdir"]) / (
                "diagnose" if args.step is None else f"diagnose_step{args.step}")
        else:
            from adaparse_jax import train as training

            if args.out is None:
                raise DiagnoseError("--out is required with --config")
            if args.step is not None:
                raise DiagnoseError("--step goes with --workdir")
            config = training.load_config(args.config, overrides)
            if args.dataset:
                config.data.dataset = str(Path(args.dataset).expanduser().resolve())
                config.data.generate = ""
                config.data.images = config.data.labels = ""
            subject = initialise(config, args.out)
            out = args.out
        report = diagnose(subject, images=args.images, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:  # ConfigError, DatasetError, CheckpointMismatchError
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write_report(report, out)
    print(markdown(report))
    print(f"wrote {files['markdown']} and {files['json']}")
    return 0


def _fingerprints(args, overrides) -> int:
    if overrides or args.step is not None or args.dataset:
        raise DiagnoseError("--config.<field> overrides, --step and --dataset do not go with --zoo")
    if not args.runs:
        raise DiagnoseError("--zoo needs --runs: the k-fold runs trained on it")
    result = fingerprints.held_out_fingerprints(args.zoo, args.runs, channels=args.channels,
                                                decide=args.decide, n_resamples=args.n_resamples,
                                                seed=args.seed)
    print(fingerprints.markdown(result))
    if args.out:
        files = write_report(result, args.out, render=fingerprints.markdown,
                             names=(fingerprints.MARKDOWN, fingerprints.JSON))
        print(f"wrote {files['markdown']} and {files['json']}")
    return 0
