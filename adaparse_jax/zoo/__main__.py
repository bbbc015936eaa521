"""CLI: python -m adaparse_jax.zoo build --size tiny|demo|bench --out DIR [options]
     python -m adaparse_jax.zoo probe --zoo DIR [--attributes a,b] [--channels rgb] [--decide vote]
         (adaparse_jax.zoo.probe)."""

from __future__ import annotations

import argparse
import time

from adaparse_jax import spectral
from adaparse_jax.zoo import probe
from adaparse_jax.zoo.build import build_zoo
from adaparse_jax.zoo.settings import SIZES, zoo_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adaparse_jax.zoo",
                                     description="Build a synthetic generator zoo (RE-116 layout).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build, resume or reuse a zoo")
    b.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny (the tests' zoo), demo or bench")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--untrained", action="store_true",
                   help="the untrained twin: same architectures and labels, random weights")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    for name in ("generators", "images", "steps", "folds"):
        b.add_argument(f"--{name}", type=int, default=None, help=f"override the size's {name}")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--compilation-cache", default=None,
                   help="directory for JAX's persistent compilation cache (speeds up rebuilds)")
    pr = sub.add_parser("probe", help="held-out spectral probe of the discrete attributes of a zoo")
    pr.add_argument("--zoo", required=True, help="a built zoo directory")
    pr.add_argument("--attributes", default=None,
                    help="comma-separated discrete attributes or loss groups (default: the six "
                         "discrete attributes)")
    pr.add_argument("--channels", default="mean", choices=spectral.CHANNELS,
                    help="features of the channel-mean (gray) image (default) or of each colour channel")
    pr.add_argument("--decide", default="mean", choices=probe.DECISIONS,
                    help="a held-out generator's class: the argmax of its images' mean probability "
                         "(default) or the majority vote of their argmaxes (the parsing networks' rule)")
    pr.add_argument("--n-resamples", type=int, default=None,
                    help="label permutations for p-values (default: stats.N_RESAMPLES)")
    args = parser.parse_args(argv)

    if args.command == "probe":
        attributes = args.attributes.split(",") if args.attributes else None
        options = {"channels": args.channels, "decide": args.decide}
        if args.n_resamples is not None:
            options["n_resamples"] = args.n_resamples
        print(probe.markdown(probe.probe(args.zoo, attributes, **options)))
        return
    overrides = {k: getattr(args, k) for k in ("generators", "images", "steps", "folds")
                 if getattr(args, k) is not None}
    config = zoo_config(args.size, trained=not args.untrained, seed=args.seed, **overrides)
    t0 = time.time()
    manifest = build_zoo(args.out, config, workers=args.workers, progress=not args.no_progress,
                         compilation_cache=args.compilation_cache)
    print(f"zoo {config.size} ({'trained' if config.trained else 'untrained'}, seed {config.seed}): "
          f"{manifest['num_generators']} generators x {manifest['images_per_generator']} images "
          f"in {args.out} (settings {manifest['settings_hash']}, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
