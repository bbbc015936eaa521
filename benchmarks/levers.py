"""The throughput levers of DESIGN.md ("Cost, and where throughput comes from"), each on and off.

All on one configuration (architecture, compute dtype, batch) with the project's own step; each
lever's rows say the setting, img/s and the ratio to the setting the project uses ('on'):

  compute dtype   bf16 vs float32 compute (parameters float32 either way; the spectra float32)
  25 branches     AdaParse's personalised blocks (11-15 + final conv) on the 25 target streams:
                  folded into the batch of one convolution per layer (the model) vs `jax.vmap`
                  over the target axis vs a Python loop of 25 calls. A component benchmark: the
                  model has no loop option, and the vmap and loop variants compute per-target
                  BatchNorm statistics (what 25 separate networks would), so they compare cost,
                  not the same function (in eval mode all three agree exactly; tested)
  donation        state donated to the step (updated in place) vs copied
  fused steps     K = 1, 4, 8 optimiser steps of the same batch size per call (`lax.scan`), and
                  the same scan unrolled (benchmark-only: XLA:CPU runs convolutions inside a loop
                  body on a slow path)
  labels          gathered on the device from the label table (the step) vs label rows built
                  on the host and transferred every step (the same step, fed those rows)
  host sync       metrics fetched on log steps only vs fetched every step (what `.item()` on
                  every loss does)
  input           one device batch reused (compute only) vs a host batch copied per step vs the
                  real loader from a prepared cache, device-resident or through grain
  parser padding  the ParsingNetwork's padding-2 convolutions as they are vs `jnp.pad` + a VALID
                  convolution (the same function; a component benchmark, the model has no option)
  NHWC            stated, not measured: every convolution is NHWC (flax.linen.Conv); the models
                  have no NCHW path, and XLA:GPU picks the physical layout of cuDNN calls itself

On a CPU the step takes seconds, so per-call overheads (dispatch, donation copies, host syncs)
vanish in the noise there; these levers are built to be read on a GPU, where a batch-16 step takes
milliseconds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaparse_jax import models, targets
from adaparse_jax import train as training
from adaparse_jax.models.dncnn import DnCNN
from benchmarks import common
from benchmarks.model_bench import (
    SHORT_DTYPE,
    Bench,
    bind_tables,
    compile_step,
    failed_row,
    host_batch,
    memory_verdict,
    row,
    train_row,
)

BRANCH_MODES = ("folded", "vmap", "loop")


def _lever_row(base: dict, lever: str, setting: str, reference: dict | None) -> dict:
    out = {**base, "section": "levers", "lever": lever, "setting": setting,
           "name": f"{lever}: {setting}"}
    if reference and reference.get("img_per_s") and out.get("img_per_s"):
        out["vs_on"] = out["img_per_s"] / reference["img_per_s"]
    return out


# ------------------------------------------------------------------------------------------------
# 25 branches: folded vs vmap vs loop.


def adaptive_blocks(cfg) -> DnCNN:
    """AdaParse's personalised run (blocks after the injection + final conv), as the model builds it."""
    return DnCNN(width=cfg.width, num_blocks=cfg.depth - 2 - cfg.inject_block,
                 first_block=cfg.inject_block + 1, out_channels=3, dtype=models.DTYPES[cfg.dtype],
                 param_dtype=models.DTYPES[cfg.param_dtype])


def branch_forward(cfg, mode: str, train: bool) -> Callable:
    """f(variables, streams [B, T, H, W, C]) -> fingerprints [B, T, H, W, 3] for one of BRANCH_MODES."""
    if mode not in BRANCH_MODES:
        raise ValueError(f"branch mode {mode!r}; expected one of {BRANCH_MODES}")
    net = adaptive_blocks(cfg)

    def one(variables, x):  # x [N, H, W, C]
        if train:
            return net.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        return net.apply(variables, x, train=False)

    def forward(variables, streams):
        b, t = streams.shape[:2]
        if mode == "folded":
            return one(variables, streams.reshape(b * t, *streams.shape[2:])).reshape(
                b, t, *streams.shape[2:4], 3)
        if mode == "vmap":
            return jax.vmap(one, in_axes=(None, 1), out_axes=1)(variables, streams)
        return jnp.stack([one(variables, streams[:, i]) for i in range(t)], axis=1)

    return forward


def branch_step(cfg, mode: str, train: bool) -> Callable:
    """Jitted: inference -> fingerprints; training -> (loss, grads w.r.t. parameters and streams)."""
    forward = branch_forward(cfg, mode, train)
    if not train:
        return jax.jit(forward)

    def loss(params, stats, streams):
        fp = forward({"params": params, "batch_stats": stats}, streams)
        return jnp.mean(jnp.square(fp.astype(jnp.float32)))

    def step(variables, streams):
        return jax.value_and_grad(loss, argnums=(0, 2))(variables["params"], variables["batch_stats"],
                                                        streams)

    return jax.jit(step)


def branch_rows(bench: Bench, dtype: str, batch: int, *, train: bool, repeats: int,
                peak: float | None, min_repeat_s: float = 0.5) -> list[dict]:
    """img/s of the personalised blocks on [B, 25, H, W, C] streams, folded / vmap / loop."""
    cfg = bench.model_config(dtype)
    net = adaptive_blocks(cfg)
    s, t = bench.image_size, targets.NUM_HEADS
    streams = jax.random.normal(jax.random.key(0), (batch, t, s, s, cfg.width), jnp.float32).astype(
        models.DTYPES[dtype])
    variables = jax.jit(lambda k: net.init(k, streams[:, 0], train=False))(jax.random.key(1))
    what = "train (value and grad)" if train else "forward"
    variants = [(f"{mode} ({what}, B={batch})", ("branches", mode, train, dtype, batch),
                 branch_step(cfg, mode, train)) for mode in BRANCH_MODES]
    details = (f"{t} streams of [{s}, {s}, {cfg.width}] per image through blocks "
               f"{cfg.inject_block + 1}-{cfg.depth - 2} + final conv")
    return _component_rows(bench, "25 branches", variants, (variables, streams), images=batch,
                           repeats=repeats, peak=peak, details=details, min_repeat_s=min_repeat_s)


def _component_rows(bench: Bench, lever: str, variants: list, args: tuple, *, images: int,
                    repeats: int, peak: float | None, details: str,
                    min_repeat_s: float = 0.5) -> list[dict]:
    """Time jitted variants of one component on the same arguments; the first is the reference.

    variants: (setting, compile key, jitted function) triples.
    """
    rows, reference = [], None
    for setting, key, jitted in variants:
        name = f"{bench.title} {lever}: {setting}"
        try:
            c = compile_step(bench, key, jitted, *args)
            skip = memory_verdict(c["memory"])
            if skip:
                r = row("levers", name, compile_s=c["compile_s"], details=skip, failed="skipped")
            else:
                timing = common.time_calls(lambda c=c: c["fn"](*args), repeats=repeats,
                                           min_repeat_s=min_repeat_s)
                flops = c["stats"].get("flops")
                r = row("levers", name, images_per_call=images, seconds=timing["seconds"],
                        xla_flops_per_img=flops / images if flops else None,
                        model_flops_per_img=common.conv_dot_flops(jitted, *args) / images,
                        peak=peak, compile_s=c["compile_s"], memory=c["memory"],
                        details=f"{details}; median of {len(timing['repeats'])} x {timing['calls']} calls")
        except Exception as e:  # noqa: BLE001
            r = failed_row("levers", name, e)
        r = _lever_row(r, lever, setting, reference)
        reference = reference or r
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------------
# Loops: host sync, host-built labels, real input.


def _loop_row(bench: Bench, name: str, call: Callable, *, images: int, repeats: int,
              peak: float | None, compile_s: float | None, details: str,
              min_repeat_s: float = 0.5, warmup: int = 1) -> dict:
    timing = common.time_calls(call, repeats=repeats, min_repeat_s=min_repeat_s, warmup=warmup)
    return row("levers", name, images_per_call=images, seconds=timing["seconds"],
               model_flops_per_img=bench.model_flops("train"), peak=peak, compile_s=compile_s,
               details=f"{details}; median of {len(timing['repeats'])} repeats x {timing['calls']} steps")


def sync_rows(bench: Bench, dtype: str, batch: int, *, repeats: int, peak: float | None,
              reference: dict, log_every: int = 50) -> list[dict]:
    """Metrics fetched every step (a host round trip per step) vs on log steps only."""
    placed = jax.device_put(host_batch(bench, batch))
    c = bench.compiled.get(("train", dtype, batch, 1, True, False))
    if c is None:
        return []
    rows = []
    for every, setting in ((log_every, f"metrics fetched every {log_every} steps"),
                           (1, "metrics fetched every step")):
        holder = {"state": bench.state, "n": 0}

        def call(every=every):
            holder["state"], metrics = c["fn"](holder["state"], placed)
            holder["n"] += 1
            if holder["n"] % every == 0:
                jax.device_get(metrics)
            return holder["state"]

        name = f"{bench.title} train {SHORT_DTYPE.get(dtype, dtype)} B={batch}: {setting}"
        try:
            r = _loop_row(bench, name, call, images=batch, repeats=repeats, peak=peak,
                          compile_s=None, details="device_get of every metric on the fetching steps")
        except Exception as e:  # noqa: BLE001
            r = failed_row("levers", name, e)
        finally:
            bench.state = holder["state"]
        rows.append(_lever_row(r, "host sync", setting, reference))
    return rows


def host_label_step(bench: Bench, dtype: str, batch: int) -> Callable:
    """The project's step fed label rows [B, 28] built on the host instead of generator ids.

    The rows become the step's label table (generator i of the batch is row i), so the labels the
    loss sees are exactly those rows; the step itself is `training.make_train_step`'s.
    """
    ids = jnp.arange(batch, dtype=jnp.int32)
    model = bench.model(dtype)

    def step(state, images, rows):
        inner = training.make_train_step(model, bench.tx, loss_config=bench.loss_config, donate=False)
        return inner(state, {"image": images, "generator": ids}, rows, bench.class_weights)

    return jax.jit(step, donate_argnums=(0,))


def label_rows(bench: Bench, dtype: str, batch: int, *, repeats: int, peak: float | None,
               reference: dict) -> list[dict]:
    host = host_batch(bench, batch)
    images = jax.device_put(host["image"])
    name = f"{bench.title} train {SHORT_DTYPE.get(dtype, dtype)} B={batch}: labels built on the host"
    holder = {"state": bench.state}
    try:
        rows0 = jax.device_put(bench.labels[host["generator"]])
        c = compile_step(bench, ("host-labels", dtype, batch), host_label_step(bench, dtype, batch),
                         bench.state, images, rows0)

        def call():
            # A host gather of this batch's label rows and its transfer, every step.
            rows = jax.device_put(bench.labels[host["generator"]])
            holder["state"], _ = c["fn"](holder["state"], images, rows)
            return holder["state"]

        r = _loop_row(bench, name, call, images=batch, repeats=repeats, peak=peak,
                      compile_s=c["compile_s"],
                      details="label rows [B, 28] gathered with NumPy and copied to the device "
                              "every step; images reused on the device")
    except Exception as e:  # noqa: BLE001
        r = failed_row("levers", name, e)
    finally:
        bench.state = holder["state"]
    on = _lever_row(reference, "labels", "gathered on the device (the step)", None)
    return [on, _lever_row(r, "labels", "built on the host, copied every step", reference)]


def make_loader_cache(root: Path, image_size: int, records: int) -> tuple:
    """A labelled synthetic dataset (8 generators) decoded into a cache; (cache, names)."""
    from adaparse_jax.data import cache, re116, synthetic

    per_generator = max(1, records // 8)
    path = synthetic.write_dataset(root / "dataset", num_generators=8,
                                   images_per_generator=per_generator, size=image_size,
                                   num_splits=1, test_per_split=1)
    dataset = re116.load_dataset(path)
    cache.prepare_dataset(dataset, root / "cache",
                          settings=cache.PrepareSettings(size=image_size), workers=1, progress=False)
    return cache.Cache(root / "cache"), dataset.names


def input_rows(bench: Bench, dtype: str, batch: int, *, repeats: int, peak: float | None,
               reference: dict, records: int) -> list[dict]:
    """The same step fed by: one reused device batch, host batches, the loader (device, grain)."""
    from adaparse_jax.data.pipeline import Loader

    rows = [_lever_row(reference, "input", "one device batch reused (compute only)", None)]
    synthetic = train_row(bench, dtype, batch, input_mode="synthetic", repeats=repeats, peak=peak,
                          section="levers")
    rows.append(_lever_row(synthetic, "input", "host batch copied every step (synthetic)", reference))
    c = bench.compiled.get(("train", dtype, batch, 1, True, False))
    if c is None:
        return rows
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        try:
            cache, names = make_loader_cache(Path(tmp), bench.image_size, records)
        except Exception as e:  # noqa: BLE001
            return rows + [failed_row("levers", "input: loader cache", e)]
        for mode, workers in (("device", 0), ("grain", 0), ("grain", cores)):
            setting = f"loader {mode}" + (f", {workers} workers" if workers else "")
            name = f"{bench.title} train {SHORT_DTYPE.get(dtype, dtype)} B={batch}: {setting}"
            holder = {"state": bench.state}
            loader = None
            try:
                loader = Loader(cache, batch_size=batch, seed=0, mode=mode, num_workers=workers,
                                names=names)

                def call(loader=loader):
                    holder["state"], _ = c["fn"](holder["state"], next(loader))
                    return holder["state"]

                # Three warm-up steps: workers started, gather compiled, first epoch table uploaded.
                r = _loop_row(bench, name, call, images=batch, repeats=repeats, peak=peak,
                              compile_s=None, warmup=3,
                              details=f"{len(cache)} cached {bench.image_size}px images of 8 "
                                      f"generators, shuffled batches")
            except Exception as e:  # noqa: BLE001
                r = failed_row("levers", name, e)
            finally:
                bench.state = holder["state"]
                if loader is not None:
                    loader.close()
            rows.append(_lever_row(r, "input", setting, reference))
    return rows


# ------------------------------------------------------------------------------------------------
# All levers.


def lever_rows(bench: Bench, dtype: str, batch: int, *, fused: tuple[int, ...], repeats: int,
               peaks: dict, loader_records: int, other_dtype: str | None = None,
               rolled_skip: str = "") -> Iterator[dict]:
    """Every lever but the AdaParse components (`branch_rows`, `padding_rows`), at (dtype, batch).

    peaks: dtype name -> FLOP/s (the MFU denominators). rolled_skip: a reason to leave out the
    rolled fused-step rows (the quick CPU plan: XLA:CPU's loop slow path makes each take minutes).
    Rows are yielded as they are measured.
    """
    peak = peaks.get(dtype)
    on = train_row(bench, dtype, batch, repeats=repeats, peak=peak, section="levers")
    if other_dtype:
        other = train_row(bench, other_dtype, batch, repeats=repeats, peak=peaks.get(other_dtype),
                          section="levers")
        yield _lever_row(on, "compute dtype", f"{dtype} (params float32)", None)
        yield _lever_row(other, "compute dtype", f"{other_dtype} (params float32)", on)
    off = train_row(bench, dtype, batch, donate=False, repeats=repeats, peak=peak, section="levers")
    yield _lever_row(on, "donation", "state donated", None)
    off = _lever_row(off, "donation", "state copied (not donated)", on)
    if off.get("memory") and on.get("memory"):
        off["details"] += (f"; compiled memory {common.gib(off['memory'])} vs "
                           f"{common.gib(on['memory'])} donated")
    yield off
    yield _lever_row(on, "fused steps", f"K=1 (B={batch} per call)", None)
    for k in (k for k in fused if k > 1):
        if rolled_skip:
            yield row("levers", f"fused steps: K={k}", lever="fused steps",
                      setting=f"K={k} steps of B={batch} per call (lax.scan)", details=rolled_skip,
                      failed="skipped")
        else:
            r = train_row(bench, dtype, batch, fused=k, repeats=repeats, peak=peak, section="levers")
            yield _lever_row(r, "fused steps", f"K={k} steps of B={batch} per call (lax.scan)", on)
        r = train_row(bench, dtype, batch, fused=k, unrolled=True, repeats=repeats, peak=peak,
                      section="levers")
        yield _lever_row(r, "fused steps", f"K={k} steps of B={batch} per call (scan unrolled, "
                                           "benchmark-only)", on)
    yield from label_rows(bench, dtype, batch, repeats=repeats, peak=peak, reference=on)
    yield from sync_rows(bench, dtype, batch, repeats=repeats, peak=peak, reference=on)
    yield from input_rows(bench, dtype, batch, repeats=repeats, peak=peak, reference=on,
                          records=loader_records)
    yield row("levers", "NHWC: every convolution", lever="NHWC", setting="the layout",
              details="flax.linen.Conv is NHWC; the models have no NCHW path to compare, and "
                      "XLA:GPU assigns cuDNN's physical layouts itself")


# ------------------------------------------------------------------------------------------------
# The parser's padding-2 convolutions.


class ParserTrunk(nn.Module):
    """The ParsingNetwork's conv stages (3x3 conv, padding 2, ReLU, 2x2 max-pool) on [N, S, S, 3].

    explicit_pad: pad with `jnp.pad` and run the convolution with VALID padding (the same function;
    XLA:CPU computes the weight gradient of a padding-2 convolution on a slow path).
    """

    features: tuple[int, ...]
    explicit_pad: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for i, f in enumerate(self.features, start=1):
            if self.explicit_pad:
                x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
            x = nn.Conv(f, (3, 3), padding="VALID" if self.explicit_pad else 2, dtype=self.dtype,
                        name=f"conv{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return x


def padding_step(cfg, explicit_pad: bool) -> Callable:
    """Jitted (loss, grads w.r.t. parameters and fingerprints) of the parser's conv trunk."""
    trunk = ParserTrunk(tuple(cfg.parser_conv_features), explicit_pad, models.DTYPES[cfg.dtype])

    def loss(params, fp):
        return jnp.mean(jnp.square(trunk.apply({"params": params}, fp).astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def padding_rows(bench: Bench, dtype: str, batch: int, *, repeats: int,
                 peak: float | None) -> list[dict]:
    """The parser's conv stages on the 25 * B fingerprints of a batch: padding=2 vs explicit pad."""
    cfg = bench.model_config(dtype)
    s, t = bench.image_size, (targets.NUM_HEADS if bench.arch == "adaparse" else 1)
    fp = jax.random.normal(jax.random.key(0), (batch * t, s, s, 3), jnp.float32)
    params = ParserTrunk(tuple(cfg.parser_conv_features)).init(jax.random.key(1), fp[:1])["params"]
    variants = [(("jnp.pad + VALID convolution (the model's default)" if explicit
                  else "padding=2 in the convolution (parser_explicit_padding=False)")
                 + f", B={batch}", ("padding", explicit, dtype, batch), padding_step(cfg, explicit))
                for explicit in (False, True)]
    return _component_rows(bench, "parser padding", variants, (params, fp), images=batch,
                           repeats=repeats, peak=peak,
                           details=f"value and grad of the 5 conv stages on {batch * t} fingerprints "
                                   f"[{s}, {s}, 3]")


# ------------------------------------------------------------------------------------------------
# Data parallel.


def parallel_rows(bench: Bench, dtype: str, per_device_batch: int, *, repeats: int,
                  peak: float | None) -> list[dict]:
    """Weak scaling: per-device batch fixed, 1 device vs all devices (`adaparse_jax.parallel`)."""
    from adaparse_jax import parallel

    devices = jax.devices()
    if len(devices) == 1:
        return [row("parallel", f"{bench.title} data parallel", details=(
            "1 device: scaling not measurable here (with --xla_force_host_platform_device_count "
            "the host devices share the same cores, so a CPU run says nothing about speed); "
            "tests/test_parallel.py checks the sharded step's results"), failed="skipped")]
    rows, single = [], None
    for n in (1, len(devices)):
        mesh = parallel.data_mesh(devices[:n])
        batch = per_device_batch * n
        name = f"{bench.title} train {SHORT_DTYPE.get(dtype, dtype)} {n} device(s), B={batch}"
        holder = {"state": parallel.replicate(bench.state, mesh)}
        try:
            placed = parallel.shard_batch(host_batch(bench, batch), mesh)
            step = bind_tables(
                training.make_train_step(bench.model(dtype), bench.tx, loss_config=bench.loss_config),
                bench)
            fn, compile_s = common.compile_timed(step, holder["state"], placed)

            def call(fn=fn, placed=placed):
                holder["state"], _ = fn(holder["state"], placed)
                return holder["state"]

            timing = common.time_calls(call, repeats=repeats)
            r = row("parallel", name, images_per_call=batch, seconds=timing["seconds"],
                    model_flops_per_img=bench.model_flops("train"),
                    peak=peak * n if peak else None, compile_s=compile_s,
                    details=f"batch sharded over a 1-D 'data' mesh, state replicated; median of "
                            f"{len(timing['repeats'])} x {timing['calls']} calls")
            if single and single.get("img_per_s") and r.get("img_per_s"):
                eff = r["img_per_s"] / (n * single["img_per_s"])
                r["details"] += f"; scaling efficiency {100 * eff:.0f}% of {n} x 1 device"
                r["scaling_efficiency"] = eff
        except Exception as e:  # noqa: BLE001
            r = failed_row("parallel", name, e)
        single = single or r
        rows.append(r)
    bench.state = jax.device_put(holder["state"], devices[0])
    return rows
