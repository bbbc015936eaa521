"""Evaluate training runs on their test generators and write the papers' tables.

  python eval.py --workdir runs/re116_s1 runs/re116_s2 runs/re116_s3 runs/re116_s4 --out results/re116
  python eval.py --workdir 'runs/re116_s*' --workdir 'runs/renet_s*' --out results/re116

Each workdir is one split of one method (AdaParse, RE-Net, Random G.T., or config.label); glob
patterns are expanded (quote them). Writes OUT/tables.md (Markdown tables like AdaParse Tables II,
III and IV, per image and per generator, mean ± std over splits, plus the mean/mode baseline),
OUT/results.json (the same numbers at full precision, confusion counts) and
OUT/confusion_<method>.png. Everything else lives in `adaparse_jax.evaluation.evaluate`.

  python eval.py --pooled --workdir 'runs/demo/runs/renet_improved*' --out results/pooled --probe runs/demo/zoo

With --pooled, the workdirs are scored as k-fold runs instead (`adaparse_jax.scoring.score_runs`,
as `make demo` scores them): the held-out predictions of every fold pooled, per attribute the
generator- and image-level macro F1 with a generator-permutation p-value, Random G.T. as mean ±
std over its seeds, a method's training seeds as replicates and as their ensemble. Writes
OUT/scores.md and OUT/scores.json; --probe ZOO adds the zoo's spectral probe as a reference row
and prints issue 12's goal (b) line of every method whose Random G.T. runs are among the workdirs.

  python eval.py --workdir runs/tiny --perturb rot90 jpeg:75 noise:4 fgsm:2 --out results/robust

With --perturb, the test images are parsed clean and after each perturbation instead (NAME[:LEVEL],
`adaparse_jax.perturb`), and OUT/robustness.md / .json hold AdaParse Table XI's layout: each
perturbation's scores next to the clean ones (`adaparse_jax.forensics.robustness`).
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
    p.add_argument("--allow-untrained", "--allow_untrained", dest="allow_untrained",
                   action="store_true",
                   help="evaluate checkpoints that record untrained parts (a converted RE-Net FEN: "
                        "random parser)")
    p.add_argument("--perturb", nargs="+", action="extend", metavar="NAME[:LEVEL]",
                   help="robustness table instead: perturbations of the test images, e.g. rot90 hflip "
                        "jpeg:75 noise:4 blur:1 resize:0.5 crop:0.8 fgsm:2 pgd:2:10 denoise:0.05")
    p.add_argument("--pooled", action="store_true",
                   help="score the workdirs as k-fold runs: pooled held-out macro F1, p-values, "
                        "replicates and ensembles (OUT/scores.md, .json)")
    p.add_argument("--probe", metavar="ZOO", help="with --pooled: a zoo directory whose spectral probe "
                   "is the reference row and the goal's bar")
    p.add_argument("--n-resamples", dest="n_resamples", type=int, default=9999,
                   help="with --pooled: permutations per p-value (default 9999)")
    return p


def pooled(args: argparse.Namespace) -> int:
    """--pooled: `scoring.score_runs` of the workdirs, its tables, and goal (b) with --probe."""
    from adaparse_jax import reporting, scoring
    from adaparse_jax.zoo import probe as zoo_probe

    try:
        report = scoring.score_runs(args.workdir, n_resamples=args.n_resamples)
        probe = zoo_probe.probe(args.probe, n_resamples=args.n_resamples) if args.probe else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = reporting.write_scores(report, args.out)
    print(reporting.scores_markdown(report, probe=probe))
    for g in (scoring.goals_b(report, probe) if probe is not None else {}).values():
        print("Goal (b): " + reporting.goal_markdown(g) + "\n")
    print(f"wrote {files['scores_md']} and {files['scores_json']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    if args.perturb:
        from adaparse_jax import perturb
        from adaparse_jax.forensics import robustness

        try:
            report = robustness.evaluate(args.workdir, args.perturb, args.out, seed=args.seed)
        except (FileNotFoundError, ValueError, perturb.PerturbationError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(robustness.markdown(report))
        print(f"wrote {report['files']['markdown']} and {report['files']['json']}")
        return 0

    if args.pooled:
        return pooled(args)

    from adaparse_jax import evaluation, reporting

    try:
        report = evaluation.evaluate(args.workdir, args.out, images_per_generator=args.images_per_generator,
                                     seed=args.seed, reuse=not args.no_reuse,
                                     allow_untrained=args.allow_untrained)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = reporting.markdown(report)
    print(text.split("\n## ")[0] + "\n## " + text.split("\n## ")[1])  # the per-image tables
    print(f"wrote {report['files']['tables']}, {report['files']['json']} and the confusion matrices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
