"""What every benchmark needs: where it ran, how to time a step, what XLA says it costs, the peak.

Timing (`time_calls`): compile happens before (ahead-of-time `lower().compile()`), then warm-up
calls, then `repeats` timed repeats. A repeat dispatches `calls` calls back to back and waits once
for the last result (`block_until_ready`), as a training loop does, so the time per call includes
the per-call dispatch a real loop pays but no host round trip per call; `calls` is chosen from the
warm-up time so that a repeat lasts about `min_repeat_s`. The result is the median over repeats.

FLOPs: `xla_flops` reads the compiled program's cost analysis (every op XLA emits: convolutions,
matrix products, elementwise, reductions; a loop body counted once, whatever its trip count).
`conv_dot_flops` counts only convolutions and matrix products, from the jaxpr, with their exact
shapes: the "model FLOPs" convention, which is what the design's counts (52.0 / 4.86 GFLOP forward)
are, so the two can be compared term by term.

Peak (`peak_matmul`): square matrix products in the given dtype with JAX's default precision (the
precision the models' convolutions and products run at), measured in the same process as the rows
it normalises; the fastest repeat of the best size, since a peak is a ceiling (on a shared CPU a
median would be dragged down by other load, and MFUs above 100% would follow).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Where and when.


def git_commit(root: Path = ROOT) -> str:
    """Short commit of the checkout, '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def device_description() -> str:
    """e.g. '1 x NVIDIA H100 80GB HBM3 (gpu)' or '1 x cpu (gpu-less host: AMD EPYC, 2 cores)'."""
    devices = jax.devices()
    d = devices[0]
    text = f"{len(devices)} x {d.device_kind} ({d.platform})"
    if d.platform == "cpu":
        text += f", host {platform.processor() or platform.machine()} with {os.cpu_count()} cores"
    return text


def environment(argv: list[str] | None = None) -> dict:
    """Device, date, commit, command and versions of this run."""
    argv = sys.argv if argv is None else argv
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv[1:])
    return {
        "device": device_description(),
        "platform": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": command.strip(),
        "jax": jax.__version__,
        "load": f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a",
    }


# ------------------------------------------------------------------------------------------------
# Timing.


def time_calls(call: Callable[[], Any], *, repeats: int, warmup: int = 1, min_repeat_s: float = 0.5,
               max_calls: int = 200) -> dict:
    """Median seconds per call of `call()` (which dispatches one call and returns its outputs).

    With warmup=0 (for steps of many seconds) no call is untimed and every repeat is one call.

    Returns {'seconds': median per call, 'calls': calls per repeat, 'repeats': [...per call...]}.
    """
    calls = 1
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        calls = int(min(max_calls, max(1, math.ceil(min_repeat_s / max(first, 1e-9)))))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return {"seconds": statistics.median(per_call), "calls": calls, "repeats": per_call,
            "warmup": warmup}


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """(compiled, seconds): lowering and compilation of `jitted` for these arguments."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Memory.


def compiled_memory(stats: dict) -> int | None:
    """Peak bytes a compiled call needs: arguments + outputs + temporaries - donated aliases."""
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    if not all(k in stats for k in keys):
        return None
    return sum(stats[k] for k in keys) - stats.get("alias_size_in_bytes", 0)


def device_peak_bytes() -> int | None:
    """The device allocator's peak so far in this process (GPU, TPU); None where not reported."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def available_bytes() -> int | None:
    """Memory a new computation can still take: the device's free memory, or the host's (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def gib(n: float | None) -> str:
    """Bytes as 'x.xx GiB' (or 'x MiB' below 1 GiB); '' for None."""
    if n is None:
        return ""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# FLOPs.


def xla_flops(stats: dict) -> float | None:
    return stats.get("flops")


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_conv_dot_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        else:
            inner = sum(_jaxpr_conv_dot_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "cond":  # one branch runs: count the dearest
                inner = max((_jaxpr_conv_dot_flops(j) for j in _sub_jaxprs(eqn.params["branches"])),
                            default=0.0)
            total += inner
    return total


def conv_dot_flops(fn: Callable, *args) -> float:
    """FLOPs (2 per multiply-add) of the convolutions and matrix products `fn(*args)` traces to."""
    return _jaxpr_conv_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ------------------------------------------------------------------------------------------------
# Peak.


def peak_matmul(dtype, size: int, repeats: int = 5) -> dict:
    """FLOP/s of a [size, size] @ [size, size] product in `dtype` (default precision): best repeat.

    Returns {'flops_per_s', 'size', 'seconds'}.
    """
    best = None
    for n in sorted({size // 2, size}):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(jnp.matmul).lower(a, b).compile()
        timing = time_calls(lambda: f(a, b), repeats=repeats, warmup=2, min_repeat_s=0.2)
        seconds = min(timing["repeats"])
        rate = 2.0 * n**3 / seconds
        if best is None or rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "size": n, "seconds": seconds}
    return best


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name
