"""Training and inference throughput of AdaParse and RE-Net: img/s, FLOPs per image, MFU, memory.

Every row compiles the project's own step (`training.make_train_step` / `make_eval_step`) ahead
of time, then times it (`common.time_calls`). One `Bench` per architecture holds the training state
(initialised once: parameters are float32 whatever the compute dtype, so the float32 and bf16 rows
share it) and the compiled steps and results, so the lever rows reuse what the model rows built.

Inputs of a row (`input_mode`):
  reuse      one batch placed on the device once and fed to every call: the step's pure compute
             (maxtext's reuse-one-batch habit);
  synthetic  a few random uint8 batches kept on the host, one transferred per call (no file
             reading, no decoding): compute plus the host-to-device copy.
The real input pipeline (grain, device-resident) is timed in `levers` and `data_bench`.

Model FLOPs (the MFU numerator): convolutions and matrix products counted from the forward jaxpr
(`common.conv_dot_flops`), times 3 for a training step (forward, input gradients, weight
gradients). At full size these are DESIGN.md's counts (AdaParse 52.0 / 156, RE-Net 4.86 / 14.6
GFLOP per image).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaparse_jax import losses, models, targets
from adaparse_jax import train as training
from adaparse_jax.data import synthetic
from benchmarks import common

# DESIGN.md, "Cost": forward and training GFLOP per 64x64 image, counted from the official models.
DESIGN_GFLOP = {"adaparse": (52.0, 156.0), "renet": (4.86, 14.6)}
TITLES = {"adaparse": "AdaParse", "renet": "RE-Net"}
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16"}
NUM_GENERATORS = 116  # label rows like RE-116's (drawn by data.synthetic.label_tables)


@dataclasses.dataclass
class Bench:
    """One architecture at one size: its state, labels and the steps compiled so far."""

    arch: str
    size: str
    tx: Any
    state: Any  # the current TrainState (train rows with donation replace it)
    labels: np.ndarray  # [G, 28]
    class_weights: dict
    loss_config: Any
    init_s: float
    reinit: Any  # () -> a fresh TrainState
    image_size: int
    forward_flops: float  # conv + matmul FLOPs per image of the forward pass (from the jaxpr)
    conv_impl: str = "auto"  # `model.conv_impl` of every model this bench builds
    compiled: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES[self.arch] + ("" if self.size == "full" else f" ({self.size})")

    def model_config(self, dtype: str):
        cfg = models.model_config(self.arch, self.size)
        cfg.dtype = dtype
        cfg.conv_impl = self.conv_impl
        return cfg

    def model(self, dtype: str):
        return models.build_model(self.model_config(dtype))

    def design(self, kind: str) -> float | None:
        if self.size != "full":
            return None
        fwd, train = DESIGN_GFLOP[self.arch]
        return 1e9 * (train if kind == "train" else fwd)

    def model_flops(self, kind: str) -> float:
        return self.forward_flops * (3 if kind == "train" else 1)


def make_bench(arch: str, size: str = "full", seed: int = 0, conv_impl: str = "auto") -> Bench:
    """Initialise the state (`training.init_state`, timed) and the labels of one architecture."""
    config = training.default_config()
    config.model = models.model_config(arch, size)
    config.model.conv_impl = conv_impl
    model = models.build_model(config.model)
    tx = training.make_optimizer(config)
    s = config.model.image_size

    def reinit():
        return jax.block_until_ready(training.init_state(model, tx, jax.random.key(seed), (s, s, 3)))

    start = time.perf_counter()
    state = reinit()
    init_s = time.perf_counter() - start
    labels = targets.label_matrix(synthetic.label_tables(NUM_GENERATORS, seed=seed))
    shapes = models.variable_shapes(config.model, batch_size=1)
    images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    forward = common.conv_dot_flops(lambda v, x: model.apply(v, x, train=False), shapes, images)
    return Bench(arch=arch, size=size, tx=tx, state=state, labels=labels,
                 class_weights=targets.class_weights(labels), loss_config=losses.default_loss_config(),
                 init_s=init_s, reinit=reinit, image_size=s, forward_flops=forward, conv_impl=conv_impl)


def host_batch(bench: Bench, batch: int, fused: int = 1, seed: int = 0) -> dict:
    """Random uint8 images and generator ids, [B, S, S, 3] / [B] (or [K, B, ...] when fused)."""
    rng = np.random.default_rng(seed)
    lead = (batch,) if fused == 1 else (fused, batch)
    s = bench.image_size
    return {"image": rng.integers(0, 256, (*lead, s, s, 3), dtype=np.uint8),
            "generator": rng.integers(0, len(bench.labels), lead, dtype=np.int32)}


def train_step_fn(bench: Bench, dtype: str, fused: int = 1, donate: bool = True,
                  unrolled: bool = False):
    """The project's train step; `unrolled` fuses K steps in a scan with `unroll=K`.

    `make_train_step(fused_steps=K)` runs K steps in a `lax.scan` loop. XLA:CPU runs convolutions
    inside a loop body on a much slower path than outside one, so the benchmark also times the
    same K steps unrolled (one straight-line program, no loop).
    """
    model = bench.model(dtype)
    step = training.make_train_step(model, bench.tx, fused_steps=fused, unroll=fused if unrolled else 1,
                                    donate=donate, loss_config=bench.loss_config)
    return bind_tables(step, bench, donate)


def bind_tables(step, bench: Bench, donate: bool = True):
    """`step(state, batch)` with the benchmark's label table and class weights bound (as constants,
    as every row has measured them)."""
    labels, weights = bench.labels, bench.class_weights
    return jax.jit(lambda state, batch: step(state, batch, labels, weights),
                   donate_argnums=(0,) if donate else ())


def compile_step(bench: Bench, key: tuple, jitted, *args) -> dict:
    """Compile once per key; {'fn', 'compile_s', 'stats', 'memory'} (memory: bytes one call needs)."""
    if key not in bench.compiled:
        fn, seconds = common.compile_timed(jitted, *args)
        stats = training.compiled_stats(fn)
        bench.compiled[key] = {"fn": fn, "compile_s": seconds, "stats": stats,
                               "memory": common.compiled_memory(stats)}
    return bench.compiled[key]


def memory_verdict(memory: int | None) -> str | None:
    """A reason to skip running a compiled call that cannot fit in the free memory, else None."""
    free = common.available_bytes()
    if memory is not None and free is not None and memory > 0.9 * free:
        return (f"skipped: one call needs {common.gib(memory)} (compiled memory analysis), "
                f"{common.gib(free)} free")
    return None


def row(section: str, name: str, *, images_per_call: int | None = None, seconds: float | None = None,
        xla_flops_per_img: float | None = None, model_flops_per_img: float | None = None,
        peak: float | None = None, compile_s: float | None = None, memory: int | None = None,
        details: str = "", **extra) -> dict:
    """One result row; img/s and MFU derived here so every section computes them the same way."""
    img_per_s = images_per_call / seconds if images_per_call and seconds else None
    mfu = (model_flops_per_img * img_per_s / peak
           if img_per_s and model_flops_per_img and peak else None)
    return {"section": section, "name": name, "img_per_s": img_per_s,
            "ms_per_call": 1e3 * seconds if seconds else None,
            "xla_gflop_per_img": xla_flops_per_img / 1e9 if xla_flops_per_img else None,
            "model_gflop_per_img": model_flops_per_img / 1e9 if model_flops_per_img else None,
            "mfu": mfu, "compile_s": compile_s, "memory": memory, "details": details, **extra}


def failed_row(section: str, name: str, error: BaseException) -> dict:
    kind = "out of memory" if common.is_out_of_memory(error) else "error"
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return row(section, name, details=f"{kind}: {type(error).__name__}: {first_line}", failed=kind)


def _input_feeder(placed: dict, host: list[dict] | None):
    """A function returning the next batch: the placed one (reuse) or the next host batch, copied."""
    if host is None:
        return lambda: placed
    i = iter(range(10**9))
    return lambda: jax.device_put(host[next(i) % len(host)])


def train_row(bench: Bench, dtype: str, batch: int, *, fused: int = 1, donate: bool = True,
              unrolled: bool = False, input_mode: str = "reuse", repeats: int = 3, warmup: int = 1,
              peak: float | None = None,
              min_repeat_s: float = 0.5, section: str = "model", name: str | None = None) -> dict:
    """Training img/s of one configuration (K = `fused` optimiser steps of `batch` per call)."""
    name = name or (f"{bench.title} train {SHORT_DTYPE.get(dtype, dtype)} B={batch}"
                    + (f" K={fused}" if fused > 1 else "") + (" unrolled" if unrolled and fused > 1 else "")
                    + ("" if donate else " no-donate")
                    + ("" if input_mode == "reuse" else f" {input_mode}"))
    unrolled = unrolled and fused > 1
    key = ("train", dtype, batch, fused, donate, input_mode, unrolled)
    if key in bench.results:
        return {**bench.results[key], "section": section, "name": name}
    try:
        placed = jax.device_put(host_batch(bench, batch, fused))
        c = compile_step(bench, ("train", dtype, batch, fused, donate, unrolled),
                         train_step_fn(bench, dtype, fused, donate, unrolled), bench.state, placed)
        skip = memory_verdict(c["memory"])
        if skip:
            return row(section, name, compile_s=c["compile_s"], memory=c["memory"], details=skip,
                       failed="skipped")
        host = ([host_batch(bench, batch, fused, seed=i) for i in range(4)]
                if input_mode == "synthetic" else None)
        feed = _input_feeder(placed, host)
        holder = {"state": bench.state}

        def call():
            holder["state"], metrics = c["fn"](holder["state"], feed())
            return holder["state"], metrics

        try:
            timing = common.time_calls(call, repeats=repeats, warmup=warmup, min_repeat_s=min_repeat_s)
        finally:
            bench.state = holder["state"]
        images = batch * fused
        flops = c["stats"].get("flops")
        # XLA's cost analysis counts a loop body once: a rolled fused call's count is one step's.
        xla = (flops / (batch if fused == 1 or not unrolled else batch * fused)) if flops else None
        result = row(section, name, images_per_call=images, seconds=timing["seconds"],
                     xla_flops_per_img=xla, model_flops_per_img=bench.model_flops("train"), peak=peak,
                     compile_s=c["compile_s"], memory=c["memory"],
                     details=_timing_details(timing, dtype, donate, input_mode),
                     kind="train", arch=bench.arch, dtype=dtype, batch=batch, fused=fused)
    except Exception as e:  # noqa: BLE001 - a row that fails is reported, the run goes on
        revive(bench)
        return failed_row(section, name, e)
    bench.results[key] = result
    return result


def revive(bench: Bench) -> None:
    """After a failed call that had donated the state (out of memory, say), initialise it again."""
    if any(x.is_deleted() for x in jax.tree_util.tree_leaves(bench.state)):
        bench.state = bench.reinit()


def infer_row(bench: Bench, dtype: str, batch: int, *, repeats: int = 3, warmup: int = 1,
              peak: float | None = None, min_repeat_s: float = 0.5, section: str = "model") -> dict:
    """Inference img/s of `training.make_eval_step` (BatchNorm running statistics, decisions)."""
    name = f"{bench.title} infer {SHORT_DTYPE.get(dtype, dtype)} B={batch}"
    key = ("infer", dtype, batch)
    if key in bench.results:
        return {**bench.results[key], "section": section, "name": name}
    try:
        placed = jax.device_put(host_batch(bench, batch))
        variables = training.variables_of(bench.state)
        c = compile_step(bench, key, training.make_eval_step(bench.model(dtype)), variables, placed)
        skip = memory_verdict(c["memory"])
        if skip:
            return row(section, name, compile_s=c["compile_s"], memory=c["memory"], details=skip,
                       failed="skipped")
        timing = common.time_calls(lambda: c["fn"](variables, placed), repeats=repeats,
                                   warmup=warmup, min_repeat_s=min_repeat_s)
        flops = c["stats"].get("flops")
        result = row(section, name, images_per_call=batch, seconds=timing["seconds"],
                     xla_flops_per_img=flops / batch if flops else None,
                     model_flops_per_img=bench.model_flops("infer"), peak=peak,
                     compile_s=c["compile_s"], memory=c["memory"],
                     details=_timing_details(timing, dtype, None, "reuse"),
                     kind="infer", arch=bench.arch, dtype=dtype, batch=batch, fused=1)
    except Exception as e:  # noqa: BLE001
        return failed_row(section, name, e)
    bench.results[key] = result
    return result


def _timing_details(timing: dict, dtype: str, donate: bool | None, input_mode: str) -> str:
    spread = f"{1e3 * min(timing['repeats']):.1f}-{1e3 * max(timing['repeats']):.1f} ms"
    parts = [f"{dtype} compute, float32 params",
             f"median of {len(timing['repeats'])} repeats x {timing['calls']} calls ({spread})"
             + ("" if timing["warmup"] else ", no untimed warm-up call")]
    if donate is not None:
        parts.append("state donated" if donate else "state not donated")
    parts.append({"reuse": "one device batch reused",
                  "synthetic": "host batch copied per call"}.get(input_mode, input_mode))
    peak = common.device_peak_bytes()
    if peak:
        parts.append(f"device peak so far {common.gib(peak)}")
    return "; ".join(parts)


def flop_check_rows(bench: Bench, dtype: str = "float32", batch: int = 2) -> list[dict]:
    """Forward and training FLOPs per image: DESIGN.md, counted from the jaxpr, and XLA's count."""
    s = bench.image_size
    placed = host_batch(bench, batch)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), placed)
    step = train_step_fn(bench, dtype, donate=False)
    train_counted = common.conv_dot_flops(step, bench.state, spec) / batch
    rows = []
    for kind, counted in (("forward", bench.forward_flops), ("train", train_counted)):
        design = bench.design("train" if kind == "train" else "infer")
        xla = next((r["xla_gflop_per_img"] * 1e9 for r in bench.results.values()
                    if r.get("kind") == ("train" if kind == "train" else "infer")
                    and r.get("dtype") == dtype and r.get("xla_gflop_per_img")), None)
        parts = [f"conv+matmul counted from the jaxpr: {counted / 1e9:.4g} GFLOP/img"]
        if design:
            parts.append(f"DESIGN.md: {design / 1e9:.4g} (counted / design = {counted / design:.3f})")
        if xla:
            parts.append(f"XLA cost analysis ({jax.default_backend()}): {xla / 1e9:.4g} "
                         f"(XLA / counted = {xla / counted:.3f})")
        if kind == "train":
            parts.append(f"3 x forward = {3 * bench.forward_flops / 1e9:.4g}")
        rows.append(row("flops", f"{bench.title} {kind} FLOPs per {s}x{s} image",
                        xla_flops_per_img=xla, model_flops_per_img=counted, details="; ".join(parts)))
    return rows


# ------------------------------------------------------------------------------------------------
# Side by side with the PyTorch twin (benchmarks/torch_twin.py).


def _twin_module():
    """benchmarks.torch_twin, or None without torch (the rows then say so)."""
    try:
        from benchmarks import torch_twin
    except ImportError:
        return None
    return torch_twin


def _interleaved(calls: dict, *, repeats: int, warmup: int) -> dict:
    """Seconds per call of each named call, timed in turns (A B A B ...); the fastest repeat each.

    On a CPU shared with other work, load changes within seconds: taking turns exposes both sides
    to the same load, and the fastest repeat is the least disturbed one.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {"seconds": min(t), "repeats": t} for name, t in times.items()}


def twin_row(bench: Bench, kind: str, batch: int, *, repeats: int = 3, warmup: int = 1,
             peak: float | None = None, threads: int | None = None) -> dict:
    """The project's compiled step and the PyTorch twin's, same weights and batch, in turns.

    Training: one optimiser step of the official loss (JAX: `training.make_train_step`, state
    donated; twin: forward, loss, backward, torch Adam); inference: eval-mode outputs (JAX:
    `make_eval_step`, which also takes the decisions; twin: `torch.inference_mode`). Both reuse one
    batch that is already in their framework's layout (NHWC uint8 on the device / NCHW float32), as
    the model rows do. float32, `threads` torch threads (default: the cores JAX's CPU client uses).
    """
    name = f"{bench.title} {kind} f32 B={batch}"
    tw = _twin_module()
    if tw is None:
        return row("twin", name, details="PyTorch twin not run: torch is not installed "
                                         "(pip install -e .[torch])", failed="skipped", kind=kind)
    import torch

    threads = threads or tw.default_threads()
    torch.set_num_threads(threads)
    dtype = "float32"
    try:
        host = host_batch(bench, batch)
        placed = jax.device_put(host)
        if kind == "train":
            c = compile_step(bench, ("train", dtype, batch, 1, True, False),
                             train_step_fn(bench, dtype), bench.state, placed)
        else:
            c = compile_step(bench, ("infer", dtype, batch),
                             training.make_eval_step(bench.model(dtype)),
                             training.variables_of(bench.state), placed)
        skip = memory_verdict(c["memory"])
        if skip:
            return row("twin", name, details=skip, failed="skipped", kind=kind)
        cfg = bench.model_config(dtype)
        twin = tw.build(cfg)
        host_state = jax.device_get({"params": bench.state.params,
                                     "batch_stats": bench.state.batch_stats})
        tw.load_variables(twin, cfg, host_state)
        del host_state
        images = tw.to_nchw(host["image"])
        generators = torch.from_numpy(host["generator"]).long()
        holder = {"state": bench.state}
        if kind == "train":
            optimizer = training.default_config().optimizer
            twin_step = tw.TrainStep(twin, optimizer, bench.loss_config, bench.labels,
                                     bench.class_weights)

            def jax_call():
                holder["state"], metrics = c["fn"](holder["state"], placed)
                jax.block_until_ready(metrics)

            def twin_call():
                twin_step(images, generators)
        else:
            variables = training.variables_of(bench.state)

            def jax_call():
                jax.block_until_ready(c["fn"](variables, placed))

            def twin_call():
                tw.infer(twin, images)

        try:
            t = _interleaved({"jax": jax_call, "twin": twin_call}, repeats=repeats, warmup=warmup)
        finally:
            bench.state = holder["state"]
        twin = None  # free the twin's weights (the closures above are done with it)
    except Exception as e:  # noqa: BLE001 - a row that fails is reported, the run goes on
        revive(bench)
        return failed_row("twin", name, e)
    flops = bench.model_flops(kind)
    jax_rate, twin_rate = batch / t["jax"]["seconds"], batch / t["twin"]["seconds"]

    def spread(s):
        return f"{1e3 * min(s['repeats']):.0f}-{1e3 * max(s['repeats']):.0f} ms"

    details = (f"PyTorch {torch.__version__} on {threads} threads vs jax {jax.__version__}; "
               f"{repeats} turns each (JAX {spread(t['jax'])}, twin {spread(t['twin'])})"
               + ("" if warmup else ", no untimed warm-up call") + "; fastest turn")
    return row("twin", name, images_per_call=batch, seconds=t["jax"]["seconds"],
               model_flops_per_img=flops, peak=peak, compile_s=c["compile_s"], memory=c["memory"],
               details=details, kind=kind, arch=bench.arch, batch=batch,
               twin_img_per_s=twin_rate, ratio=jax_rate / twin_rate,
               twin_mfu=flops * twin_rate / peak if peak else None)
