"""python -m adaparse_jax.forensics {attribute,detect,pairs} --workdir RUN --out DIR

  attribute  which training generator made an image (closed set), and is it one at all (open set)
  detect     real photographs vs generated images (--real DIR: a folder of real images, e.g. for RE-116)
  pairs      same-source verification: are two images from the same (unseen) generator?

Each writes DIR/<command>.md, DIR/<command>.json and DIR/<command>_roc.png (attribute also
DIR/attribute_confusion.png); see adaparse_jax.forensics.tasks for what each table measures.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from adaparse_jax.forensics import features, tasks

    p = argparse.ArgumentParser(prog="python -m adaparse_jax.forensics", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=tasks.COMMANDS)
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    p.add_argument("--out", required=True, help="output directory for the tables and the ROC plot")
    p.add_argument("--features", default="both", choices=features.FEATURE_SETS,
                   help="frozen features per image (default: both = head + spectrum)")
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help="at most N images per generator (default: all)")
    p.add_argument("--real", default=None, metavar="DIR",
                   help="detect: a folder of real images (default: the bundled photographs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/test splits and image draws")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 2:
        p.error(f"--images {args.images}: need at least 2 images per generator (half fit, half test)")
    try:
        report = tasks.run_command(args.command, args.workdir, args.out, feature_set=args.features,
                                   seed=args.seed, max_per_generator=args.images, real=args.real)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tasks.markdown(report))
    print("wrote " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
