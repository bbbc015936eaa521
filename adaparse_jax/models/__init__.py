"""AdaParse and RE-Net in flax.linen: configs, builders and parameter counts.

    cfg = models.model_config("adaparse")               # full size, faithful to the official model
    cfg = models.model_config("renet", size="tiny")     # for tests
    cfg.fusion = "add"                                   # ablations are overrides
    model = models.build_model(cfg)

Every model maps normalised images [B, S, S, 3] to the output dict of `parsing.FENParser`; its
variables are {'params': {'fen', 'parser'}, 'batch_stats': {'fen'}}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from adaparse_jax import targets
from adaparse_jax.models import conv_ops
from adaparse_jax.models.adaparse import AdaParse, PersonalizedFEN
from adaparse_jax.models.dncnn import FINAL_INITS, BatchNorm, ConvBNReLU, DnCNN, dncnn_fen
from adaparse_jax.models.hypernet import FUSIONS, BroadcastedFusion, DualEncoder, InstanceAwareEncoder
from adaparse_jax.models.parsing import (
    FEN_INPUTS,
    FINGERPRINT_SKIPS,
    PARSER_INITS,
    PARSER_INPUT_NORMS,
    PARSER_POOLS,
    PARSER_SPECTRA,
    SPECTRUM_CHANNELS,
    SPECTRUM_INPUTS,
    FENParser,
    ParsingNetwork,
    head_features,
)
from adaparse_jax.models.renet import RENet

ARCHS = ("adaparse", "renet")
SIZES = ("full", "tiny")
# float64 needs jax_enable_x64; the parity check uses it to compute the exact function value.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def model_config(arch: str = "adaparse", size: str = "full") -> ml_collections.ConfigDict:
    """Default model config. `size="full"` is the official model; "tiny" is for tests only.

    Fields (all arches carry all fields; RE-Net ignores the hypernetwork's):
      arch: 'adaparse' | 'renet'.
      image_size: input height = width.
      width, depth: DnCNN channels and convolutions (stem and final included).
      source_block: DnCNN block whose output feeds the hypernetwork (0 = the stem's output).
      inject_block: block after which the per-target channel mixing is applied.
      extractor_features: channels of the Instance-Aware encoder's conv-BN-ReLU-maxpool stages.
      fc_features: widths of its FC + BN + ReLU layers before the code layer.
      code_dim: D of z_it, z_b, z_hp. hidden_dim: width of the weight-generation MLP.
      use_instance_code / use_base_code / use_hp_code: z_it, z_b, z_hp on or off.
      fusion: 'concat' (official) | 'add' | 'attention' (see hypernet.BroadcastedFusion).
      parser_conv_features, parser_fc_features: ParsingNetwork stages and FC widths.
      parser_explicit_padding: the parser's padding-2 convolutions as jnp.pad + VALID convolution
        (the same function, fast on XLA:CPU; see parsing.ParsingNetwork) or padding=2 (False).
      dropout: dropout rate before the parser's fc1.
      fen_input: 'image' (official) | 'highpass' (the FEN reads a fixed high-pass residual).
      fingerprint_skip: 'none' (official) | 'highpass' (fingerprints = FEN output + that residual).
      fen_final_init: 'kaiming' (official) | 'zero': the FEN's final convolution starts at 0, so
        with fingerprint_skip='highpass' every fingerprint starts as the image's residual
        whatever the seed and the FEN learns a correction to it.
      parser_input_norm: 'none' (official) | 'rms' (each fingerprint scaled to unit RMS).
      parser_pool: 'flatten' (official) | 'global' (spatial mean, std and max per channel).
      parser_init: 'torch' (official) | 'he' (He-normal kernels, zero biases).
      parser_spectrum: 'none' (official) | 'concat' | 'only': the parser's spectral branch (the
        probe's features of each fingerprint, `parsing.ParsingNetwork`) beside or instead of its convs.
      parser_spectrum_heads: False (official) | True: the heads also read the spectral features
        directly (a linear path beside the FC layers; needs a spectral branch).
      parser_spectrum_channels: 'mean' (default) | 'rgb': the spectral branch reads the
        fingerprint's channel mean or each of its channels.
      parser_spectrum_input: 'fingerprint' (default) | 'image': the spectral branch reads each
        fingerprint or the image itself (the spectral probe's input and features).
      (The last ten are the learning options of docs/EXPERIMENTS.md; `models.parsing` and `models.dncnn` have them.)
      conv_impl: how the DnCNN's and the parser's convolutions are computed, the same function either way
        (`conv_ops.CONV_IMPLS`): 'auto' (default: on a CPU backend 'weight_dots' for batches of
        at least `conv_ops.MIN_DOT_BATCH` images, such as AdaParse's 25 folded streams per image,
        where XLA's weight gradients of convolutions are slow; 'xla' otherwise and on other
        backends), 'xla', 'weight_dots'.
      dtype: compute dtype 'float32' | 'bfloat16' ('float64' with jax_enable_x64, for checks);
      param_dtype: parameter dtype.
    """
    if arch not in ARCHS:
        raise ValueError(f"config field arch={arch!r}; expected one of {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"model size {size!r}; expected one of {SIZES}")
    cfg = ml_collections.ConfigDict()
    cfg.arch = arch
    cfg.image_size = 64
    cfg.width = 64
    cfg.depth = 17
    cfg.source_block = 5
    cfg.inject_block = 10
    cfg.extractor_features = (128, 256, 512)
    cfg.fc_features = (4096, 1024)
    cfg.code_dim = 256
    cfg.hidden_dim = 2048
    cfg.use_instance_code = True
    cfg.use_base_code = True
    cfg.use_hp_code = True
    cfg.fusion = "concat"
    cfg.parser_conv_features = (32, 64, 128, 256, 512)
    cfg.parser_fc_features = (512, 256, 64)
    cfg.parser_explicit_padding = True
    cfg.dropout = 0.5
    cfg.fen_input = "image"
    cfg.fingerprint_skip = "none"
    cfg.fen_final_init = "kaiming"
    cfg.parser_input_norm = "none"
    cfg.parser_pool = "flatten"
    cfg.parser_init = "torch"
    cfg.parser_spectrum = "none"
    cfg.parser_spectrum_heads = False
    cfg.parser_spectrum_channels = "mean"
    cfg.parser_spectrum_input = "fingerprint"
    cfg.conv_impl = "auto"
    cfg.dtype = "float32"
    cfg.param_dtype = "float32"
    if size == "tiny":
        cfg.image_size = 32
        cfg.width = 8
        cfg.depth = 7
        cfg.source_block = 2
        cfg.inject_block = 4
        cfg.extractor_features = (16, 32, 64)
        cfg.fc_features = (64, 32)
        cfg.code_dim = 16
        cfg.hidden_dim = 32
        cfg.parser_conv_features = (4, 8, 8, 16, 16)
        cfg.parser_fc_features = (32, 16, 8)
    return cfg


def _check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the config field for unknown fields and invalid values."""
    known = set(model_config())
    unknown = sorted(set(cfg) - known)
    missing = sorted(known - set(cfg))
    if unknown or missing:
        raise ValueError(f"model config: unknown fields {unknown}, missing fields {missing}")

    def fail(field, expected):
        raise ValueError(f"config field {field}={cfg[field]!r}; expected {expected}")

    if cfg.arch not in ARCHS:
        fail("arch", f"one of {ARCHS}")
    if cfg.conv_impl not in conv_ops.CONV_IMPLS:
        fail("conv_impl", f"one of {conv_ops.CONV_IMPLS}")
    if cfg.fusion not in FUSIONS:
        fail("fusion", f"one of {FUSIONS}")
    for field, choices in (("fen_input", FEN_INPUTS), ("fingerprint_skip", FINGERPRINT_SKIPS),
                           ("fen_final_init", FINAL_INITS),
                           ("parser_input_norm", PARSER_INPUT_NORMS),
                           ("parser_pool", PARSER_POOLS), ("parser_init", PARSER_INITS),
                           ("parser_spectrum", PARSER_SPECTRA),
                           ("parser_spectrum_channels", SPECTRUM_CHANNELS),
                           ("parser_spectrum_input", SPECTRUM_INPUTS)):
        if cfg[field] not in choices:
            fail(field, f"one of {choices}")
    for field in ("dtype", "param_dtype"):
        if cfg[field] not in DTYPES:
            fail(field, f"one of {tuple(DTYPES)}")
    for field in ("image_size", "width", "code_dim", "hidden_dim"):
        if not isinstance(cfg[field], int) or isinstance(cfg[field], bool) or cfg[field] < 1:
            fail(field, "a positive integer")
    if not isinstance(cfg.parser_spectrum_heads, bool):
        fail("parser_spectrum_heads", "True or False")
    if cfg.parser_spectrum_heads and cfg.parser_spectrum == "none":
        fail("parser_spectrum_heads", "False with parser_spectrum='none' (the heads' linear path reads "
             "the spectral branch)")
    if cfg.parser_spectrum_input != "fingerprint" and cfg.parser_spectrum == "none":
        fail("parser_spectrum_input", "'fingerprint' with parser_spectrum='none' (no spectral branch "
             "to read the image)")
    if cfg.parser_spectrum != "none" and cfg.image_size % 4:
        fail("parser_spectrum", "'none' for an image_size not divisible by 4 (the spectral branch "
                                "reads positions modulo 4)")
    if not isinstance(cfg.depth, int) or cfg.depth < 2:
        fail("depth", "an integer >= 2 (stem and final convolution)")
    for field in ("extractor_features", "fc_features", "parser_conv_features", "parser_fc_features"):
        v = cfg[field]
        if (not isinstance(v, (tuple, list)) or not v
                or not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in v)):
            fail(field, "a non-empty tuple of positive integers")
    for field in ("use_instance_code", "use_base_code", "use_hp_code", "parser_explicit_padding"):
        if not isinstance(cfg[field], bool):
            fail(field, "True or False")
    if not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1:
        fail("dropout", "a rate in [0, 1)")
    if cfg.arch == "adaparse":
        if not isinstance(cfg.source_block, int) or not 0 <= cfg.source_block <= cfg.depth - 2:
            fail("source_block", f"an integer in [0, depth - 2 = {cfg.depth - 2}]")
        if (not isinstance(cfg.inject_block, int)
                or not cfg.source_block <= cfg.inject_block <= cfg.depth - 2):
            fail("inject_block", f"an integer in [source_block = {cfg.source_block}, "
                                 f"depth - 2 = {cfg.depth - 2}]")
        if not (cfg.use_instance_code or cfg.use_base_code or cfg.use_hp_code):
            fail("use_instance_code", "at least one of use_instance_code, use_base_code, "
                                      "use_hp_code to be True")
        if cfg.image_size < 2 ** len(cfg.extractor_features):
            fail("image_size", f">= {2 ** len(cfg.extractor_features)} (one pixel left after "
                               f"the {len(cfg.extractor_features)} max-pools of the hypernetwork)")


def build_model(cfg: ml_collections.ConfigDict) -> FENParser:
    """The flax Module (AdaParse or RENet) a config describes; invalid configs raise ValueError."""
    _check_config(cfg)
    kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
    parser = ParsingNetwork(tuple(cfg.parser_conv_features), tuple(cfg.parser_fc_features),
                            float(cfg.dropout), explicit_padding=cfg.parser_explicit_padding,
                            input_norm=cfg.parser_input_norm, pool=cfg.parser_pool,
                            initializer=cfg.parser_init, spectrum=cfg.parser_spectrum,
                            spectrum_heads=cfg.parser_spectrum_heads,
                            spectrum_channels=cfg.parser_spectrum_channels,
                            conv_impl=cfg.conv_impl, **kw)
    if cfg.arch == "renet":
        fen = dncnn_fen(cfg.width, cfg.depth, conv_impl=cfg.conv_impl, final_init=cfg.fen_final_init, **kw)
        return RENet(fen=fen, parser=parser,
                     image_size=cfg.image_size, fen_input=cfg.fen_input,
                     fingerprint_skip=cfg.fingerprint_skip, spectrum_input=cfg.parser_spectrum_input)
    hypernet = DualEncoder(
        num_targets=targets.NUM_HEADS, width=cfg.width,
        stage_features=tuple(cfg.extractor_features), fc_features=tuple(cfg.fc_features),
        code_dim=cfg.code_dim, hidden_dim=cfg.hidden_dim,
        use_instance_code=cfg.use_instance_code, use_base_code=cfg.use_base_code,
        use_hp_code=cfg.use_hp_code, fusion=cfg.fusion, **kw)
    fen = PersonalizedFEN(hypernet=hypernet, width=cfg.width, depth=cfg.depth,
                          source_block=cfg.source_block, inject_block=cfg.inject_block,
                          conv_impl=cfg.conv_impl, final_init=cfg.fen_final_init, **kw)
    return AdaParse(fen=fen, parser=parser, image_size=cfg.image_size, fen_input=cfg.fen_input,
                    fingerprint_skip=cfg.fingerprint_skip, spectrum_input=cfg.parser_spectrum_input)


def variable_shapes(cfg: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    """Shapes and dtypes of the model's variables, by `jax.eval_shape` (nothing is allocated)."""
    model = build_model(cfg)
    images = jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)


def param_count(tree) -> int:
    """Number of scalars in a pytree of arrays (or of ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Trainable parameters of the FEN and of the parser, counted without allocating them."""
    params = variable_shapes(cfg)["params"]
    return {"fen": param_count(params["fen"]), "parser": param_count(params["parser"])}


__all__ = [
    "ARCHS", "AdaParse", "BatchNorm", "BroadcastedFusion", "ConvBNReLU", "DTYPES", "DnCNN",
    "DualEncoder", "FENParser", "FUSIONS", "InstanceAwareEncoder", "ParsingNetwork",
    "PersonalizedFEN", "RENet", "build_model", "dncnn_fen", "head_features", "model_config",
    "param_count", "param_counts", "variable_shapes",
]
