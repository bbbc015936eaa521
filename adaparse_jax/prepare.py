"""Decode a dataset once into the 64x64 uint8 cache that training reads.

  python -m adaparse_jax.prepare --images ROOT --labels DIR --out CACHE      # RE-116 / RE-123
  python -m adaparse_jax.prepare --dataset DIR_OR_DATASET_JSON --out CACHE   # e.g. a synthetic zoo
  python -m adaparse_jax.prepare --folder DIR --out CACHE                    # unlabelled images

The tree is validated first (missing, empty or extra generator folders, label files, splits) and a
bad tree is refused before any decoding. Rerunning continues an interrupted run and skips finished
shards; a cache made with other settings is refused unless --rebuild. Every skipped file is printed
and listed with its reason in CACHE/manifest.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from adaparse_jax.data import cache, re116


def _alias(text: str) -> tuple[str, str]:
    folder, sep, name = text.partition("=")
    if not sep or not folder or not name:
        raise argparse.ArgumentTypeError(f"alias {text!r} is not FOLDER=GENERATOR")
    return folder, name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adaparse_jax.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image root: one folder per generator (needs --labels)")
    src.add_argument("--dataset", help="a dataset.json, or a directory holding one")
    src.add_argument("--folder", help="a plain folder of images without labels (searched recursively)")
    p.add_argument("--labels", help="directory with the official label tables (.npy)")
    p.add_argument("--out", required=True, help="cache directory (created)")
    p.add_argument(
        "--variant",
        default="auto",
        choices=("auto",) + re116.VARIANTS,
        help="which official label set (default: whichever complete set --labels holds)",
    )
    p.add_argument("--names", help="generator names in label-row order, one per line (default: shipped)")
    p.add_argument("--splits", help="splits.json to validate (default: the shipped official splits)")
    p.add_argument(
        "--alias",
        action="append",
        type=_alias,
        default=[],
        metavar="FOLDER=GENERATOR",
        help="a folder not named after its generator (repeatable); Z_1..Z_7 are built in for RE-123",
    )
    p.add_argument("--generators", help="comma-separated generators to prepare (default: all)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--size", type=int, default=64, help="output side in pixels (default 64, the official)")
    p.add_argument(
        "--high-bit-depth",
        default="clip",
        choices=cache.HIGH_BIT_DEPTH_MODES,
        help="16-bit grayscale: 'clip' as PIL's convert('RGB') and the official loader do "
        "(default), or 'scale' to map 0..65535 to 0..255",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="files per shard (unit of work and resume)")
    p.add_argument("--rebuild", action="store_true", help="clear a cache made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def report(manifest: dict, out: str, seconds: float) -> str:
    """Human summary of a manifest: totals, per-generator problems, every skipped file."""
    t = manifest["totals"]
    run = manifest["prepare"]
    rate = t["files"] / seconds if run["shards_run"] and seconds > 0 else 0.0
    lines = [
        f"{manifest['settings']['dataset']}: {len(manifest['generators'])} generator(s), {t['files']} files "
        f"-> {t['images']} images, {t['skipped']} skipped; {run['shards_run']} shard(s) decoded, "
        f"{run['shards_reused']} reused, {seconds:.1f} s" + (f" ({rate:.0f} files/s)" if rate else "")
    ]
    lines.append(f"cache: {out} (manifest: {out}/{cache.MANIFEST})")
    if manifest["skipped"]:
        lines.append("skipped files:")
        lines.extend(f"  {s['path']}: {s['reason']}" for s in manifest["skipped"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = cache.PrepareSettings(
        size=args.size, high_bit_depth=args.high_bit_depth, shard_size=args.shard_size
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", re116.ExtraFoldersWarning)
        try:
            if args.folder:
                manifest = cache.prepare_folder(
                    args.folder,
                    args.out,
                    settings=settings,
                    workers=args.workers,
                    rebuild=args.rebuild,
                    progress=not args.no_progress,
                )
            else:
                if args.images and not args.labels:
                    raise re116.DatasetError("--images needs --labels (the directory with the label tables)")
                if args.dataset:
                    dataset = re116.load_dataset(args.dataset, aliases=dict(args.alias))
                else:
                    dataset = re116.load_dataset(
                        images=args.images,
                        labels=args.labels,
                        names=args.names,
                        splits=args.splits,
                        variant=args.variant,
                        aliases=dict(args.alias),
                    )
                gens = (
                    [g.strip() for g in args.generators.split(",") if g.strip()] if args.generators else None
                )
                manifest = cache.prepare_dataset(
                    dataset,
                    args.out,
                    settings=settings,
                    workers=args.workers,
                    rebuild=args.rebuild,
                    progress=not args.no_progress,
                    generators=gens,
                )
        except (re116.DatasetError, cache.CacheError) as e:
            if isinstance(e, cache.EmptyGeneratorsError):
                print(report(e.manifest, args.out, time.perf_counter() - start))
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            print(f"error: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(report(manifest, args.out, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
