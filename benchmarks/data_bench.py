"""Input throughput: decoding a tree into the cache (prepare), and batches delivered to the device.

  python -m benchmarks.data_bench [--quick]       # prints a Markdown table
  from benchmarks import data_bench; data_bench.run(quick=True)   # rows for BENCHMARKS.md

prepare: a synthetic RE-116-like tree (PNG and JPEG, sides 32..1024 px in equal numbers, smooth
content with noise, as generator outputs are) decoded with 1 process and with every core.
loader: a cache of 64x64 images read by the training loader; each batch is waited for on the
device (`block_until_ready`), so img/s is what the training step can be fed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIDES = (32, 64, 128, 256, 512, 1024)


def _write_tree(root: Path, images_per_generator: int, generators: int, sides, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for g in range(generators):
        folder = root / f"G{g:03d}"
        folder.mkdir(parents=True)
        for i in range(images_per_generator):
            side = sides[i % len(sides)]
            yy, xx = np.mgrid[0:side, 0:side] / side
            base = np.stack([np.sin(6 * xx + g), np.cos(5 * yy + i), xx * yy], -1) * 100 + 128
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            suffix = ".png" if (i // len(sides)) % 2 == 0 else ".jpg"
            Image.fromarray(pixels).save(folder / f"{i:05d}{suffix}", quality=90)
            count += 1
    return count


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: a cost that other load does not change."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _prepare_rows(tmp: Path, quick: bool) -> list[dict]:
    per_gen = 40 if quick else 200
    cores = os.cpu_count() or 1
    rows = []
    for label, sides in ((f"mixed {SIDES[0]}-{SIDES[-1]} px", SIDES), ("256 px", (256,))):
        tree = tmp / f"tree_{sides[-1]}_{len(sides)}"
        n = _write_tree(tree, per_gen, 5, sides)
        shard_size = max(4, n // (4 * cores))  # small enough that every process gets several
        for workers in sorted({1, cores}):
            # The user's command in a fresh process: spawned workers re-import the parent's
            # __main__, which here would be this JAX-importing benchmark, not the prepare CLI.
            out = tmp / f"cache_{tree.name}_w{workers}"
            command = [sys.executable, "-m", "adaparse_jax.prepare", "--folder", str(tree),
                       "--out", str(out), "--workers", str(workers),
                       "--shard-size", str(shard_size), "--no-progress"]
            start, cpu = time.perf_counter(), _cpu_seconds()
            subprocess.run(command, check=True, capture_output=True)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["totals"]["images"] == n
            rows.append(
                {
                    "name": f"data/prepare {label} PNG+JPEG, {workers} process(es)",
                    "img_per_s": n / seconds,
                    "details": f"`python -m adaparse_jax.prepare --workers {workers}`: {n} images in "
                    f"{seconds:.1f} s (interpreter start included), {1000 * cpu / n:.2f} ms CPU per image "
                    f"(all processes), {cores} CPU cores, load "
                    f"average {os.getloadavg()[0]:.1f}; decode, RGB, 64x64 PIL bilinear resize, shard writes",
                }
            )
    return rows


def _loader_rows(tmp: Path, quick: bool) -> list[dict]:
    import jax

    from adaparse_jax.data import cache
    from adaparse_jax.data.pipeline import Loader

    n = _write_tree(tmp / "small", 256 if quick else 1024, 8, (64,), seed=1)
    cache.prepare_folder(tmp / "small", tmp / "cache64", progress=False)
    c = cache.Cache(tmp / "cache64")
    device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    cores = os.cpu_count() or 1
    settings = [
        ("grain", 0, 16),
        ("grain", 0, 256),
        ("grain", cores, 256),
        ("device", 0, 16),
        ("device", 0, 256),
    ]
    rows = []
    for mode, workers, batch in settings:
        loader = Loader(c, batch_size=batch, seed=0, mode=mode, num_workers=workers)
        steps = (40 if quick else 200) if batch == 16 else (8 if quick else 40)
        for _ in range(3):  # workers started, functions compiled, first table uploaded
            jax.block_until_ready(next(loader))
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(next(loader))
        seconds = time.perf_counter() - start
        loader.close()
        rows.append(
            {
                "name": f"data/loader {mode}, batch {batch}" + (f", {workers} workers" if workers else ""),
                "img_per_s": steps * batch / seconds,
                "details": f"{steps} batches of uint8 [{batch}, 64, 64, 3] to {device}; cache of {n} "
                f"records; {cores} CPU cores, load average {os.getloadavg()[0]:.1f}",
            }
        )
    return rows


def run(quick: bool) -> list[dict]:
    """Rows {name, img_per_s, details}: prepare throughput, then loader throughput."""
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        tmp = Path(tmp)
        return _prepare_rows(tmp, quick) + _loader_rows(tmp, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute on 2 cores)")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| benchmark | img/s | details |\n|---|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['img_per_s']:,.0f} | {r['details']} |")


if __name__ == "__main__":
    main()
