"""Evaluate training runs on their test generators and write the papers' tables.

  python eval.py --workdir runs/re116_s1 runs/re116_s2 runs/re116_s3 runs/re116_s4 --out results/re116
  python eval.py --workdir 'runs/re116_s*' --workdir 'runs/renet_s*' --out results/re116

Each workdir is one split of one method (AdaParse, RE-Net, Random G.T., or config.label); glob
patterns are expanded (quote them). Writes OUT/tables.md (Markdown tables like AdaParse Tables II,
III and IV, per image and per generator, mean ± std over splits, plus the mean/mode baseline),
OUT/results.json (the same numbers at full precision, confusion counts) and
OUT/confusion_<method>.png. Everything else lives in `adaparse_jax.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import sys


def _images_per_generator(text: str) -> list[int | None]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"{part!r} is not a positive number of images or 'all'")
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (hyphenated flags; the underscore spellings of earlier versions are aliases)."""
    p = argparse.ArgumentParser(prog="python eval.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", nargs="+", action="extend", required=True,
                   help="training workdirs or glob patterns (repeatable)")
    p.add_argument("--out", required=True, help="output directory for tables.md, results.json, PNGs")
    p.add_argument("--images-per-generator", "--images_per_generator", dest="images_per_generator",
                   type=_images_per_generator, default=[1, 10, 100, None],
                   help="N of the per-generator rows, comma-separated (default 1,10,100,all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-generator image draws")
    p.add_argument("--no-reuse", "--no_reuse", dest="no_reuse", action="store_true",
                   help="predict again even where a workdir holds predictions of the same checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    from adaparse_jax import evaluation, reporting

    try:
        report = evaluation.evaluate(args.workdir, args.out, images_per_generator=args.images_per_generator,
                                     seed=args.seed, reuse=not args.no_reuse)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = reporting.markdown(report)
    print(text.split("\n## ")[0] + "\n## " + text.split("\n## ")[1])  # the per-image tables
    print(f"wrote {report['files']['tables']}, {report['files']['json']} and the confusion matrices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
