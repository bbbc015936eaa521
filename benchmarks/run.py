"""`make bench`: run the benchmarks and append a dated section of rows to BENCHMARKS.md.

  python -m benchmarks.run                 # the full plan: run it on a GPU (hours on a CPU)
  python -m benchmarks.run --quick         # a few minutes on a 2-core CPU (`make bench QUICK=1`)
  python -m benchmarks.run --sections model --archs adaparse --dtypes bfloat16   # a slice

Sections, in order:
  peak      a large matrix product per compute dtype (the MFU denominator, measured in this run)
  model     training and inference img/s of AdaParse and RE-Net at full size (`model_bench`)
  twin      the same steps side by side with the PyTorch twin (`torch_twin`, optional `torch`
            extra): RE-Net training, AdaParse training and inference at batch 8, float32, timed
            in turns in this process, each pair with its ratio (CPU only)
  flops     FLOPs per image: DESIGN.md's counts, the jaxpr's conv + matmul count, XLA's count
  levers    each throughput lever on and off (`levers`)
  parallel  data-parallel weak scaling over the devices present (`adaparse_jax.parallel`)
  data      the input pipeline's delivered img/s (`data_bench`) next to the step's consumption

Plans (`--quick` or not):
  full   per architecture and compute dtype (float32, bfloat16): training at batch 16, 64, 128 and
         K = 4, 8 fused steps of batch 16; inference at 16, 64, 128; levers on AdaParse bf16 batch
         16; the 25-branch lever on training at batch 16. Rows whose compiled memory exceeds the free
         memory are reported as skipped, not run.
  quick  RE-Net float32 and bf16 (training batch 4, inference batch 8), AdaParse float32 (training
         and inference at batch 2, training with 2 repeats: ~40 s per step on 2 cores); levers on
         RE-Net float32 batch 4 with K = 1, 2 (on a CPU without the rolled `lax.scan` rows, see
         `levers`); the 25-branch lever on AdaParse's forward and the parser-padding lever at
         batch 1. AdaParse bf16 rows are left out (each adds minutes on a CPU, which has no bf16
         speed-up to show); the bf16 lever is measured on RE-Net.

Exit status 1 when a row failed with an error (out of memory and skipped rows are not errors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from benchmarks import common, levers, model_bench

SECTIONS = ("peak", "model", "twin", "flops", "levers", "parallel", "data")
DTYPES = ("float32", "bfloat16")
ARCHS = ("adaparse", "renet")


def plan(quick: bool, size: str) -> dict:
    """What each section runs. `size='tiny'` shrinks the models for a smoke test of the plan."""
    gpu = jax.default_backend() != "cpu"
    if quick:
        p = {
            "repeats": 3,
            "peak_size": 8192 if gpu else 1024,
            "model": [("renet", "float32", "train", 4, 1), ("renet", "float32", "infer", 8, 1),
                      ("renet", "bfloat16", "train", 4, 1), ("renet", "bfloat16", "infer", 8, 1),
                      ("adaparse", "float32", "infer", 2, 1), ("adaparse", "float32", "train", 2, 1)],
            # ~40 s per AdaParse training step on 2 cores: 2 timed calls, no untimed warm-up (the
            # step is compiled ahead of time, so the first call compiles nothing).
            "timing_for": {("adaparse", "train"): {"repeats": 2, "warmup": 0}},
            "lever": {"arch": "renet", "dtype": "float32", "batch": 4, "fused": (1, 2),
                      "other_dtype": "bfloat16", "loader_records": 256,
                      "rolled_skip": "" if gpu else (
                          "skipped in the quick CPU plan: XLA:CPU runs the convolutions of a loop "
                          "body on a slow path, ~10x slower per step (minutes per call); measured "
                          "in BENCHMARKS.md's lever table and by the full plan")},
            "branches": {"dtype": "float32", "batch": 1, "train": False},
            "padding": {"dtype": "float32", "batch": 1},
            "parallel": {"arch": "renet", "dtype": "float32", "per_device_batch": 4},
        }
    else:
        model = []
        for arch in ARCHS:
            for dtype in DTYPES:
                model += [(arch, dtype, "train", b, 1) for b in (16, 64, 128)]
                model += [(arch, dtype, "train", 16, k) for k in (4, 8)]
                model += [(arch, dtype, "infer", b, 1) for b in (16, 64, 128)]
        p = {
            "repeats": 5,
            "peak_size": 8192 if gpu else 2048,
            "model": model,
            "timing_for": {},
            "lever": {"arch": "adaparse", "dtype": "bfloat16", "batch": 16, "fused": (1, 4, 8),
                      "other_dtype": "float32", "loader_records": 2048, "rolled_skip": ""},
            "branches": {"dtype": "bfloat16", "batch": 16, "train": True},
            "padding": {"dtype": "bfloat16", "batch": 16},
            "parallel": {"arch": "adaparse", "dtype": "bfloat16", "per_device_batch": 16},
        }
    # Side by side with the PyTorch twin: (arch, kind, batch, timing). An AdaParse training step
    # takes tens of seconds on 2 cores: 2 turns each and no untimed warm-up (the JAX step is
    # compiled ahead of time; the fastest turn is the warm one).
    p["twin"] = [] if gpu else [
        ("renet", "train", 8, {"repeats": 3, "warmup": 1}),
        ("adaparse", "infer", 8, {"repeats": 3, "warmup": 1}),
        ("adaparse", "train", 8, {"repeats": 2, "warmup": 0})]
    p["size"] = size
    return p


# ------------------------------------------------------------------------------------------------
# Markdown.


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "" if x is None else (f"{100 * x:.1f}%" if x >= 0.001 else f"{100 * x:.3f}%")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(env: dict, peaks: dict, rows: list[dict], wall_s: float, inits: dict) -> str:
    out = [f"### {env['date']} · {env['device']} · commit {env['commit']}", ""]
    init_text = ", ".join(f"{k} {v:.1f} s" for k, v in inits.items())
    out.append(f"`{env['command']}` · jax {env['jax']} · load average {env['load']} at start · "
               f"{wall_s:.0f} s in all" + (f" · state init: {init_text}" if init_text else ""))
    out.append("")
    if peaks:
        out.append("Peak (matrix product, default precision, this run): " + ", ".join(
            f"{d} {p['flops_per_s'] / 1e12:.3g} TFLOP/s (n={p['size']})" for d, p in peaks.items()))
        out.append("")
    def table(header: str, cells, selected: list[dict]) -> None:
        if selected:
            names = header.split(" | ")
            left = ("lever", "setting", "details")
            out.extend([f"| {header} |", "|" + "|".join("---" if i == 0 or n in left else "---:"
                                                         for i, n in enumerate(names)) + "|"])
            out.extend("| " + " | ".join(_cell(c) for c in cells(r)) + " |" for r in selected)
            out.append("")

    table("benchmark | img/s | ms/call | GFLOP/img (XLA) | model GFLOP/img | MFU | compile s | memory "
          "| details",
          lambda r: (r["name"], _num(r["img_per_s"]), _num(r["ms_per_call"]), _num(r["xla_gflop_per_img"]),
                     _num(r["model_gflop_per_img"]), _pct(r["mfu"]), _num(r["compile_s"]),
                     common.gib(r["memory"]), r["details"]),
          [r for r in rows if r["section"] in ("model", "parallel")])
    table("side by side (float32) | JAX img/s | twin img/s | JAX / twin | JAX MFU | twin MFU "
          "| compile s | memory | details",
          lambda r: (r["name"], _num(r["img_per_s"]), _num(r.get("twin_img_per_s")),
                     _num(r.get("ratio")), _pct(r["mfu"]), _pct(r.get("twin_mfu")),
                     _num(r["compile_s"]), common.gib(r["memory"]), r["details"]),
          [r for r in rows if r["section"] == "twin"])
    table("FLOPs per image | GFLOP (XLA) | GFLOP (conv + matmul, counted) | details",
          lambda r: (r["name"], _num(r["xla_gflop_per_img"]), _num(r["model_gflop_per_img"]), r["details"]),
          [r for r in rows if r["section"] == "flops"])
    table("lever | setting | img/s | vs on | MFU | compile s | details",
          lambda r: (r.get("lever", ""), r.get("setting", r["name"]), _num(r["img_per_s"]),
                     _num(r.get("vs_on")), _pct(r["mfu"]), _num(r["compile_s"]), r["details"]),
          [r for r in rows if r["section"] == "levers"])
    table("input pipeline | img/s | details",
          lambda r: (r["name"], _num(r["img_per_s"]), r["details"]),
          [r for r in rows if r["section"] == "data"])
    return "\n".join(out) + "\n"


def append(path: Path, text: str) -> None:
    if not path.exists():
        path.write_text("# Benchmarks\n\nRows appended by `make bench` (`python -m benchmarks.run`).\n\n")
    with path.open("a") as f:
        f.write("\n" + text)


# ------------------------------------------------------------------------------------------------
# Sections.


def headroom_rows(data: list[dict], rows: list[dict]) -> list[dict]:
    """Loader img/s at batch 16 next to the training steps of the model section."""
    steps = [r for r in rows if r["section"] == "model" and r.get("kind") == "train" and r.get("img_per_s")]
    out = []
    for d in data:
        if not d["name"].startswith("data/loader") or "batch 16" not in d["name"]:
            continue
        parts = [f"{_num(d['img_per_s'] / s['img_per_s'])}x {s['name']} ({_num(s['img_per_s'])} img/s)"
                 for s in steps if s.get("batch") in (2, 4, 16) and s.get("fused") == 1]
        if parts:
            out.append(model_bench.row("data", f"headroom: {d['name'].removeprefix('data/')}",
                                       details="delivers " + "; ".join(parts) + " (goal: >= 3x)"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute CPU plan")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--archs", default=",".join(ARCHS), help="model rows of these architectures")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="model rows in these compute dtypes")
    parser.add_argument("--batches", default="", help="model rows at these batch sizes only, e.g. 16,64")
    parser.add_argument("--size", default="full", choices=("full", "tiny"),
                        help="model size ('tiny' only to smoke-test the bench itself)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per row (0: the plan's)")
    parser.add_argument("--lever-arch", choices=ARCHS, help="levers on this architecture (plan's default)")
    parser.add_argument("--lever-dtype", choices=DTYPES, help="levers in this compute dtype")
    parser.add_argument("--lever-batch", type=int, help="levers at this batch size")
    parser.add_argument("--fused", help="fused-step counts of the lever, e.g. 1,4,8 (given: the rolled "
                                        "lax.scan rows are measured on a CPU too)")
    parser.add_argument("--out", default=str(common.ROOT / "BENCHMARKS.md"),
                        help="Markdown file to append to")
    parser.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    parser.add_argument("--json", default="", help="also write every row and the environment here")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; expected some of {', '.join(SECTIONS)}")
    archs = [a for a in args.archs.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = {int(b) for b in args.batches.split(",") if b}
    for a in archs:
        if a not in ARCHS:
            parser.error(f"unknown architecture {a!r}; expected some of {', '.join(ARCHS)}")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; expected some of {', '.join(DTYPES)}")

    start = time.perf_counter()
    env = common.environment(["benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    p = plan(args.quick, args.size)
    for field in ("arch", "dtype", "batch"):
        value = getattr(args, f"lever_{field}")
        if value is not None:
            p["lever"][field] = value
    if args.fused:
        p["lever"]["fused"] = tuple(int(k) for k in args.fused.split(","))
        p["lever"]["rolled_skip"] = ""
    repeats = args.repeats or p["repeats"]
    rows: list[dict] = []
    benches: dict[str, model_bench.Bench] = {}

    def log(r: dict) -> None:
        rows.append(r)
        rate = f"{r['img_per_s']:,.3g} img/s" if r.get("img_per_s") else r.get("failed", "")
        print(f"[{time.perf_counter() - start:6.0f} s] {r['name']}: {rate}", file=sys.stderr, flush=True)

    def bench(arch: str) -> model_bench.Bench:
        if arch not in benches:
            benches[arch] = model_bench.make_bench(arch, args.size)
            print(f"[{time.perf_counter() - start:6.0f} s] {arch} state initialised in "
                  f"{benches[arch].init_s:.1f} s", file=sys.stderr, flush=True)
        return benches[arch]

    wanted = (["float32"] if "twin" in sections and p["twin"] else [])
    wanted += [d for _, d, *_ in p["model"] if d in dtypes] + [p["lever"]["dtype"], p["branches"]["dtype"],
                                                               p["padding"]["dtype"]]
    wanted += [p["lever"]["other_dtype"]] if p["lever"]["other_dtype"] in dtypes else []
    peaks = {}
    if "peak" in sections:
        for d in dict.fromkeys(wanted):
            peaks[d] = common.peak_matmul(jax.numpy.dtype(d), p["peak_size"])
            print(f"peak {d}: {peaks[d]['flops_per_s'] / 1e12:.3g} TFLOP/s", file=sys.stderr, flush=True)
    rate = {d: v["flops_per_s"] for d, v in peaks.items()}

    if "model" in sections:
        for arch, dtype, kind, batch, fused in p["model"]:
            if arch not in archs or dtype not in dtypes or (batches and batch not in batches):
                continue
            timing = {"repeats": repeats, "warmup": 1}
            if not args.repeats:
                timing.update(p["timing_for"].get((arch, kind), {}))
            b = bench(arch)
            if kind == "train":
                log(model_bench.train_row(b, dtype, batch, fused=fused, peak=rate.get(dtype), **timing))
            else:
                log(model_bench.infer_row(b, dtype, batch, peak=rate.get(dtype), **timing))
    if "twin" in sections:
        if not p["twin"]:
            log(model_bench.row("twin", "PyTorch twin", details="the twin runs on the CPU only; "
                                "not run on a " + jax.default_backend(), failed="skipped"))
        for arch, kind, batch, timing in p["twin"]:
            if arch not in archs or (batches and batch not in batches):
                continue
            if args.repeats:
                timing = {**timing, "repeats": args.repeats}
            log(model_bench.twin_row(bench(arch), kind, batch, peak=rate.get("float32"), **timing))
    if "flops" in sections:
        for arch in archs:
            for r in model_bench.flop_check_rows(bench(arch)):
                log(r)
    if "levers" in sections:
        lv = p["lever"]
        other = lv["other_dtype"] if lv["other_dtype"] in dtypes else None
        for r in levers.lever_rows(bench(lv["arch"]), lv["dtype"], lv["batch"], fused=lv["fused"],
                                   repeats=repeats, peaks=rate, loader_records=lv["loader_records"],
                                   other_dtype=other, rolled_skip=lv["rolled_skip"]):
            log(r)
        if "adaparse" in archs:
            br, pd = p["branches"], p["padding"]
            for r in levers.branch_rows(bench("adaparse"), br["dtype"], br["batch"], train=br["train"],
                                        repeats=repeats, peak=rate.get(br["dtype"])):
                log(r)
            for r in levers.padding_rows(bench("adaparse"), pd["dtype"], pd["batch"], repeats=repeats,
                                         peak=rate.get(pd["dtype"])):
                log(r)
    if "parallel" in sections:
        pp = p["parallel"]
        for r in levers.parallel_rows(bench(pp["arch"]), pp["dtype"], pp["per_device_batch"],
                                      repeats=repeats, peak=rate.get(pp["dtype"])):
            log(r)
    if "data" in sections:
        from benchmarks import data_bench

        data = [{**model_bench.row("data", r["name"], details=r["details"]), "img_per_s": r["img_per_s"]}
                for r in data_bench.run(args.quick)]
        for r in data + headroom_rows(data, rows):
            log(r)

    wall = time.perf_counter() - start
    text = markdown(env, peaks, rows, wall, {model_bench.TITLES[a]: b.init_s for a, b in benches.items()})
    print(text)
    if not args.no_append:
        append(Path(args.out), text)
        print(f"appended to {args.out}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "peaks": peaks, "rows": rows,
                                               "wall_s": wall}, indent=1, default=str))
    errors = [r for r in rows if r.get("failed") == "error"]
    for r in errors:
        print(f"ERROR {r['name']}: {r['details']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
