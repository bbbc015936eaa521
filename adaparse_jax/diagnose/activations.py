"""Layer outputs in a training-mode pass: dead units, image-dependent spread, fingerprints (section 3)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaparse_jax.data import pipeline
from adaparse_jax.diagnose.subject import batch_key, flat

# Module paths whose output feeds a ReLU: the captured output is the pre-activation (convolution,
# dense, BatchNorm) or, for a DnCNN block, the post-ReLU output; both are > 0 exactly where the
# unit is active. The tests check the table against the models' layer counts.
RELU_LAYERS = re.compile(r"(^|/)(stem|block\d+|stage\d+_bn|instance_encoder/bn\d+|fusion/bn"
                         r"|parser/conv\d+|parser/fc\d+)$")
HEAD_LAYERS = re.compile(r"^parser/head_\w+$")


def _capture(module, method_name: str, calls: list | None = None) -> bool:
    """capture_intermediates filter: the layers of `RELU_LAYERS` and `HEAD_LAYERS`; their paths are
    appended to `calls` in the order the model calls them (when it traces)."""
    path = "/".join(module.path)
    keep = method_name == "__call__" and bool(RELU_LAYERS.search(path) or HEAD_LAYERS.match(path))
    if keep and calls is not None:
        calls.append(path)
    return keep


def _layer_moments(x: jax.Array, relu: bool, batch: int) -> dict:
    """Per-batch statistics of one layer output [B or B*T, ..., C] (the image axis outermost)."""
    units = x.reshape(-1, x.shape[-1]) > 0
    a = jnp.maximum(x, 0) if relu else x
    a = a.astype(jnp.float32).reshape(batch, -1)
    mean = a.mean(0)
    return {"mean": mean, "m2": jnp.sum(jnp.square(a - mean), 0),
            "ever": units.any(0), "always": units.all(0)}


def activation_pass(model, params, batch_stats, batches: Sequence[dict], *, seed: int = 0,
                    fingerprint_heads: Sequence[int] | None = None) -> dict:
    """Layer statistics over `batches` (training mode, the gradient pass's dropout keys).

    Returns:
      layers: {path: {'kind': 'relu' | 'head', 'units', 'dead', 'always_on', 'spread', 'std'}}:
        dead / always_on: fractions of units (last axis) never / always > 0 on every image and
        position; spread: RMS over elements of the std across images / RMS of the mean across
        images (after the ReLU for ReLU layers); std: that RMS std.
      fingerprints: float32 [N, len(fingerprint_heads), S, S, 3] (all heads when None);
      fingerprint_rms, input_rms: RMS of every fingerprint and of the normalised input.
    """

    calls: list[str] = []  # the captured layers in call order (network order)

    def forward(p, batch, key):
        x = pipeline.normalize(batch["image"])
        out, state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 rngs={"dropout": key},
                                 capture_intermediates=functools.partial(_capture, calls=calls),
                                 mutable=["batch_stats", "intermediates"])
        b = x.shape[0]
        stats = {}
        for path, value in flat(state["intermediates"]).items():
            if not path.endswith("/__call__"):  # sown values (the parser's features), not layers
                continue
            path = path.removesuffix("/__call__")
            stats[path] = _layer_moments(value[0], bool(RELU_LAYERS.search(path)), b)
        fp = out["fingerprints"]
        return {"stats": stats,
                "fingerprints": (fp if fingerprint_heads is None else fp[:, list(fingerprint_heads)]
                                 ).astype(jnp.float32),
                "fp_sq": jnp.mean(jnp.square(fp.astype(jnp.float32))),
                "x_sq": jnp.mean(jnp.square(x))}

    forward = jax.jit(forward)
    merged: dict[str, dict] = {}
    n = 0
    fps, fp_sq, x_sq = [], [], []
    for i, batch in enumerate(batches):
        res = jax.device_get(forward(params, batch, batch_key(seed, i)))
        nb = int(batch["image"].shape[0])
        for path, s in res["stats"].items():
            mean, m2 = np.asarray(s["mean"], np.float64), np.asarray(s["m2"], np.float64)
            m = merged.get(path)
            if m is None:
                merged[path] = {"mean": mean, "m2": m2, "ever": s["ever"], "always": s["always"]}
                continue
            # Chan et al.'s parallel update: exact pooled mean and sum of squared deviations.
            delta = mean - m["mean"]
            total = n + nb
            m["m2"] = m["m2"] + m2 + np.square(delta) * n * nb / total
            m["mean"] = m["mean"] + delta * nb / total
            m["ever"] = m["ever"] | s["ever"]
            m["always"] = m["always"] & s["always"]
        n += nb
        fps.append(res["fingerprints"])
        fp_sq.append(float(res["fp_sq"]))
        x_sq.append(float(res["x_sq"]))
    layers = {}
    for path, m in merged.items():
        var = m["m2"] / n
        std = float(np.sqrt(var.mean()))
        const = float(np.sqrt(np.square(m["mean"]).mean()))
        layers[path] = {"kind": "relu" if RELU_LAYERS.search(path) else "head",
                        "units": int(m["ever"].size),
                        "dead": float(np.mean(~m["ever"])), "always_on": float(np.mean(m["always"])),
                        "spread": std / const if const > 0 else None, "std": std}
    order = list(dict.fromkeys(calls))
    return {"layers": {p: layers[p] for p in sorted(layers, key=order.index)}, "fingerprints": np.concatenate(fps),
            "fingerprint_rms": float(np.sqrt(np.mean(fp_sq))), "input_rms": float(np.sqrt(np.mean(x_sq)))}

