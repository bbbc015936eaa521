"""The whole training step with each `model.conv_impl`, in turns: which one a CPU should use.

`conv_bench` times single convolutions; this times the compiled training step of a full-size
model (`model_bench.train_row`, batch B, float32), once per setting of `conv_impl`, the settings
alternating (A B A B ...) so that the machine's load falls on both alike:

  python -m benchmarks.step_impl --arch renet --batch 8 --impls xla auto --turns 2

Each turn prints the step time range of its repeats and the compile time.
"""

from __future__ import annotations

import argparse

from adaparse_jax.models import conv_ops
from benchmarks import model_bench


def step_row(arch: str, impl: str, batch: int, repeats: int) -> dict:
    """`model_bench.train_row` of `arch` at full size with `conv_impl=impl`."""
    bench = model_bench.make_bench(arch, conv_impl=impl)
    return model_bench.train_row(bench, "float32", batch, repeats=repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("renet", "adaparse"), default="renet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--impls", nargs="+", choices=conv_ops.CONV_IMPLS, default=["xla", "auto"])
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for turn in range(1, args.turns + 1):
        for impl in args.impls:
            r = step_row(args.arch, impl, args.batch, args.repeats)
            print(f"turn {turn} conv_impl={impl}: {r['name']}: median "
                  f"{r.get('ms_per_call') or float('nan'):.0f} ms, {r.get('details')}; compile "
                  f"{r.get('compile_s', float('nan')):.1f} s", flush=True)


if __name__ == "__main__":
    main()
