"""Each convolution of the models, pass by pass: XLA's convolution against patch matrix products.

For every distinct convolution shape of a model at a batch size (DnCNN blocks, stem, final conv,
the hypernetwork's stages, the parser's stages on the padded maps), the three passes of training
are timed separately, each with the ways it can be computed:

  forward        xla (lax.conv_general_dilated) | patches (im2col: the kh*kw shifted views
                 concatenated on channels, one [N*H*W, kh*kw*C] x [kh*kw*C, F] product)
  input grad     xla (autodiff's transposed convolution) | patches (im2col of the padded dy with
                 the flipped, transposed kernel)
  weight grad    xla (autodiff's convolution over the whole image) | weight_dots (one
                 [kw*C, N*H*W] x [N*H*W, F] product per kernel row: `models.conv_ops`) | patches
                 (one [kh*kw*C, N*H*W] x [N*H*W, F] product on the im2col matrix)

All variants of one pass are timed in turns (A B C A B C ...), the fastest turn each, and checked
against xla's result (relative error in the details). `python -m benchmarks.conv_bench --arch renet
--batch 8` prints the table; `benchmarks.run` puts its rows in the lever table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaparse_jax import models, targets
from adaparse_jax.models import conv_ops

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_shapes(cfg, batch: int) -> list[dict]:
    """Distinct convolutions of a model: name, count per step, input [N, H, W, C], F, padding."""
    s, w = cfg.image_size, cfg.width
    streams = batch * (targets.NUM_HEADS if cfg.arch == "adaparse" else 1)
    shapes = []
    if cfg.arch == "adaparse":
        shared = cfg.source_block + (cfg.inject_block - cfg.source_block)  # blocks on B images
        adaptive = cfg.depth - 2 - cfg.inject_block
        shapes += [dict(name="DnCNN block, B images", count=shared, n=batch, hw=s, c=w, f=w, pad=1),
                   dict(name="DnCNN block, 25B streams", count=adaptive, n=streams, hw=s, c=w, f=w,
                        pad=1)]
        c, hw = w, s
        for i, f in enumerate(cfg.extractor_features, start=1):
            shapes.append(dict(name=f"hypernet stage {i}", count=1, n=batch, hw=hw, c=c, f=f, pad=1))
            c, hw = f, hw // 2
    else:
        shapes.append(dict(name="DnCNN block", count=cfg.depth - 2, n=batch, hw=s, c=w, f=w, pad=1))
    shapes += [dict(name="stem (3 -> width)", count=1, n=batch, hw=s, c=3, f=w, pad=1),
               dict(name="final (width -> 3)", count=1, n=streams, hw=s, c=w, f=3, pad=1)]
    c, hw = 3, s
    for i, f in enumerate(cfg.parser_conv_features, start=1):
        # The parser pads by 2 with jnp.pad and convolves VALID (the model's default).
        shapes.append(dict(name=f"parser stage {i}", count=1, n=streams, hw=hw + 4, c=c, f=f, pad=0))
        c, hw = f, (hw + 2) // 2
    return shapes


def _pads(pad: int) -> tuple:
    return ((pad, pad), (pad, pad))


def _patches(x, kh: int, kw: int, ho: int, wo: int):
    """[N, H, W, C] (already padded) -> [N, ho, wo, kh*kw*C], taps major, channels minor."""
    return jnp.concatenate([x[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], axis=-1)


def forward_fn(impl: str, pad: int):
    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), _pads(pad), dimension_numbers=_NHWC)

    def patches(x, w):
        kh, kw, c, f = w.shape
        xp = jnp.pad(x, ((0, 0), *_pads(pad), (0, 0)))
        ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        return jnp.dot(_patches(xp, kh, kw, ho, wo).reshape(-1, kh * kw * c),
                       w.reshape(kh * kw * c, f)).reshape(x.shape[0], ho, wo, f)

    return {"xla": xla, "patches": patches}[impl]


def input_grad_fn(impl: str, pad: int):
    def xla(x, w, dy):
        return jax.vjp(lambda x: forward_fn("xla", pad)(x, w), x)[1](dy)[0]

    def patches(x, w, dy):
        # dx = dy (padded by k - 1 - pad) correlated with the kernel flipped in space, in and out
        # swapped.
        kh, kw, c, f = w.shape
        q = kh - 1 - pad
        dyp = jnp.pad(dy, ((0, 0), (q, q), (q, q), (0, 0)))
        wf = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2).reshape(kh * kw * f, c)
        h, wd = x.shape[1:3]
        return jnp.dot(_patches(dyp, kh, kw, h, wd).reshape(-1, kh * kw * f), wf).reshape(x.shape)

    return {"xla": xla, "patches": patches}[impl]


def weight_grad_fn(impl: str, pad: int):
    def xla(x, w, dy):
        return jax.vjp(lambda w: forward_fn("xla", pad)(x, w), w)[1](dy)[0]

    def dots(x, w, dy):
        return jax.vjp(lambda w: conv_ops.conv_weight_dots(x, w, _pads(pad)), w)[1](dy)[0]

    def patches(x, w, dy):
        kh, kw, c, f = w.shape
        xp = jnp.pad(x, ((0, 0), *_pads(pad), (0, 0)))
        ho, wo = dy.shape[1:3]
        p = _patches(xp, kh, kw, ho, wo).reshape(-1, kh * kw * c)
        return jnp.dot(p.T, dy.reshape(-1, f)).reshape(w.shape)

    return {"xla": xla, "weight_dots": dots, "patches": patches}[impl]


PASSES = {"forward": (forward_fn, ("xla", "patches")),
          "input grad": (input_grad_fn, ("xla", "patches")),
          "weight grad": (weight_grad_fn, ("xla", "weight_dots", "patches"))}


def time_layer(shape: dict, *, repeats: int = 3, passes=tuple(PASSES), seed: int = 0) -> list[dict]:
    """Seconds of every variant of every pass of one convolution shape (fastest of turns)."""
    n, hw, c, f, pad = shape["n"], shape["hw"], shape["c"], shape["f"], shape["pad"]
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (n, hw, hw, c), jnp.float32)
    w = jax.random.normal(keys[1], (3, 3, c, f), jnp.float32) / np.sqrt(9 * c)
    ho = hw + 2 * pad - 2
    dy = jax.random.normal(keys[2], (n, ho, ho, f), jnp.float32)
    flops = 2.0 * n * ho * ho * f * 9 * c
    out = []
    for name in passes:
        make, impls = PASSES[name]
        args = (x, w) if name == "forward" else (x, w, dy)
        fns = {i: jax.jit(make(i, pad)).lower(*args).compile() for i in impls}
        ref = np.asarray(fns["xla"](*args))
        errors = {i: float(np.linalg.norm(np.asarray(f_(*args)) - ref) / np.linalg.norm(ref))
                  for i, f_ in fns.items()}
        times = {i: [] for i in impls}
        for _ in range(repeats):
            for i, f_ in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(f_(*args))
                times[i].append(time.perf_counter() - start)
        for i in impls:
            best = min(times[i])
            out.append({**shape, "pass": name, "impl": i, "seconds": best, "gflops": flops / best / 1e9,
                        "vs_xla": min(times["xla"]) / best, "rel_error": errors[i]})
    return out


def model_rows(arch: str, batch: int, *, size: str = "full", repeats: int = 3) -> list[dict]:
    cfg = models.model_config(arch, size)
    rows = []
    for shape in conv_shapes(cfg, batch):
        rows += time_layer(shape, repeats=repeats)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| convolution | x count | input | pass | impl | ms | GFLOP/s | xla / impl | rel. error |",
           "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['count']} | [{r['n']}, {r['hw']}, {r['hw']}, {r['c']}] -> {r['f']}"
                   f" | {r['pass']} | {r['impl']} | {1e3 * r['seconds']:.1f} | {r['gflops']:.1f} | "
                   f"{r['vs_xla']:.2f} | {r['rel_error']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="renet", choices=models.ARCHS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="full", choices=models.SIZES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="only convolutions whose name contains this")
    args = parser.parse_args(argv)
    cfg = models.model_config(args.arch, args.size)
    rows = []
    for shape in conv_shapes(cfg, args.batch):
        if args.only in shape["name"]:
            rows += time_layer(shape, repeats=args.repeats)
            print(markdown(rows[-7:]).split("\n", 2)[2], flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
