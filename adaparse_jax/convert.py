"""Official PyTorch state dicts -> Flax variables (and back).

Covers AdaParse (`Personalized_FEN` + `ParsingNet`, the `state_dict_cnn` and `state_dict_class`
entries of the official `.pickle` checkpoints) and RE-Net's DnCNN FEN. The official RE-Net parser
is an older 8-flag network with other heads; this package's RE-Net uses the AdaParse
ParsingNetwork, so only RE-Net's FEN converts.

Every conversion follows a *plan*: one entry per torch tensor, generated from the model config
(block layout) and from `targets` (head order), naming the Flax collection and path it fills and
how its layout changes:

- conv   [out, in, kh, kw] -> kernel [kh, kw, in, out]
- linear [out, in]         -> kernel [in, out]
- flat   linear after a flattened conv map: torch flattened [C, H, W], the Flax models flatten
         [H, W, C], so the kernel's rows are permuted as well
- same   vectors, codes and BatchNorm statistics

`num_batches_tracked` buffers are accepted and dropped. Unknown, missing and mis-shaped tensors
raise one ValueError that lists them all.
"""

from __future__ import annotations

import dataclasses
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np

from adaparse_jax import models, targets

PARAMS = "params"
BATCH_STATS = "batch_stats"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor of a plan: where it goes in the Flax variables and how."""

    torch_name: str
    collection: str  # PARAMS or BATCH_STATS
    path: tuple[str, ...]  # inside the collection, e.g. ('fen', 'shared', 'stem', 'kernel')
    layout: str  # 'conv' | 'linear' | 'flat' | 'same'
    channels: int = 0  # for 'flat': channels of the flattened map


def official_head_names() -> dict[str, str]:
    """Official parser head modules -> target names, generated from the targets table.

    fc8_k: the k-th continuous or discrete head; fc9_k: the k-th coarse group; fc10_k: the k-th
    loss flag (the official parser's order, which is the order of `targets.HEADS` / `GROUPS`).
    """
    arch_heads = [t for t in targets.HEADS if t.kind != targets.FLAG]
    families = (("fc8", arch_heads), ("fc9", targets.GROUPS), ("fc10", targets.FLAG_TARGETS))
    return {f"{prefix}_{k}": t.name for prefix, ts in families for k, t in enumerate(ts, start=1)}


def _conv(torch: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{torch}.weight", PARAMS, (*path, "kernel"), "conv"),
            Entry(f"{torch}.bias", PARAMS, (*path, "bias"), "same")]


def _dense(torch: str, path: tuple[str, ...], channels: int = 0) -> list[Entry]:
    return [Entry(f"{torch}.weight", PARAMS, (*path, "kernel"), "flat" if channels else "linear",
                  channels),
            Entry(f"{torch}.bias", PARAMS, (*path, "bias"), "same")]


def _bn(torch: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{torch}.weight", PARAMS, (*path, "scale"), "same"),
            Entry(f"{torch}.bias", PARAMS, (*path, "bias"), "same"),
            Entry(f"{torch}.running_mean", BATCH_STATS, (*path, "mean"), "same"),
            Entry(f"{torch}.running_var", BATCH_STATS, (*path, "var"), "same")]


def _dncnn_run(torch: str, path: tuple[str, ...], blocks: range, stem: bool, final: bool) -> list[Entry]:
    """A torch nn.Sequential of DnCNN layers -> a `dncnn.DnCNN` run named `path`."""
    plan, i = [], 0
    if stem:
        plan += _conv(f"{torch}.0.0", (*path, "stem"))
        i = 1
    for j, block in enumerate(blocks, start=i):
        plan += _conv(f"{torch}.{j}.0", (*path, f"block{block}", "conv"))
        plan += _bn(f"{torch}.{j}.1", (*path, f"block{block}", "bn"))
    if final:
        plan += _conv(f"{torch}.{i + len(blocks)}", (*path, "final"))
    return plan


def _check_official(cfg: ml_collections.ConfigDict, arch: str) -> None:
    if cfg.arch != arch:
        raise ValueError(f"config field arch={cfg.arch!r}; this conversion is for {arch!r}")
    if arch == "adaparse":
        if cfg.fusion != "concat" or not (cfg.use_instance_code and cfg.use_base_code
                                          and cfg.use_hp_code):
            raise ValueError("official AdaParse weights need config fields fusion='concat' and "
                             "use_instance_code = use_base_code = use_hp_code = True")


def fen_plan(cfg: ml_collections.ConfigDict | None = None) -> list[Entry]:
    """Plan for AdaParse's Personalized_FEN (`state_dict_cnn`), Flax paths under ('fen', ...)."""
    cfg = cfg or models.model_config("adaparse")
    _check_official(cfg, "adaparse")
    s, j, d = cfg.source_block, cfg.inject_block, cfg.depth
    enc = ("fen", "hypernet", "instance_encoder")
    fusion = ("fen", "hypernet", "fusion")
    plan = [Entry("hypernet.basecode", PARAMS, ("fen", "hypernet", "z_b"), "same"),
            Entry("hypernet.hpcode", PARAMS, ("fen", "hypernet", "z_hp"), "same")]
    for i in range(len(cfg.extractor_features)):
        plan += _conv(f"hypernet.extractor.{i}.0", (*enc, f"stage{i + 1}_conv"))
        plan += _bn(f"hypernet.extractor.{i}.1", (*enc, f"stage{i + 1}_bn"))
    n = len(cfg.fc_features)
    for i in range(1, n + 1):
        plan += _dense(f"hypernet.fc{i}", (*enc, f"fc{i}"),
                       channels=cfg.extractor_features[-1] if i == 1 else 0)
        plan += _bn(f"hypernet.bn{i}", (*enc, f"bn{i}"))
    plan += _dense(f"hypernet.fc{n + 1}", (*enc, f"fc{n + 1}"))
    plan += _dense(f"hypernet.fc{n + 2}", (*fusion, "fc1"))
    plan += _bn(f"hypernet.bn{n + 1}", (*fusion, "bn"))
    plan += _dense(f"hypernet.fc{n + 3}", (*fusion, "fc2"))
    plan += _dncnn_run("layers", ("fen", "shared"), range(1, s + 1), stem=True, final=False)
    plan += _dncnn_run("layers1", ("fen", "middle"), range(s + 1, j + 1), stem=False, final=False)
    plan += _dncnn_run("layers2", ("fen", "adaptive"), range(j + 1, d - 1), stem=False, final=True)
    return plan


def parser_plan(cfg: ml_collections.ConfigDict | None = None) -> list[Entry]:
    """Plan for AdaParse's ParsingNet (`state_dict_class`), Flax paths under ('parser', ...)."""
    cfg = cfg or models.model_config("adaparse")
    plan = []
    for i in range(1, len(cfg.parser_conv_features) + 1):
        plan += _conv(f"layer{i}.0", ("parser", f"conv{i}"))
    for i in range(1, len(cfg.parser_fc_features) + 1):
        plan += _dense(f"fc{i}", ("parser", f"fc{i}"),
                       channels=cfg.parser_conv_features[-1] if i == 1 else 0)
    for torch, name in official_head_names().items():
        plan += _dense(torch, ("parser", f"head_{name}"))
    return plan


def renet_fen_plan(cfg: ml_collections.ConfigDict | None = None) -> list[Entry]:
    """Plan for RE-Net's DnCNN (`state_dict_cnn` of RE-Net), Flax paths under ('fen', ...)."""
    cfg = cfg or models.model_config("renet")
    _check_official(cfg, "renet")
    return _dncnn_run("layers", ("fen",), range(1, cfg.depth - 1), stem=True, final=True)


def to_flax_layout(x: np.ndarray, entry: Entry) -> np.ndarray:
    """One torch tensor -> the Flax array of `entry` (see the module docstring for layouts)."""
    if entry.layout == "conv":
        return x.transpose(2, 3, 1, 0)
    if entry.layout == "linear":
        return x.T
    if entry.layout == "flat":
        out, flat = x.shape
        # torch rows are (C, H*W)-ordered, Flax rows (H*W, C)-ordered.
        return x.reshape(out, entry.channels, flat // entry.channels).transpose(2, 1, 0).reshape(flat, out)
    return x


def to_torch_layout(x: np.ndarray, entry: Entry) -> np.ndarray:
    """Inverse of `to_flax_layout`."""
    if entry.layout == "conv":
        return x.transpose(3, 2, 0, 1)
    if entry.layout == "linear":
        return x.T
    if entry.layout == "flat":
        flat, out = x.shape
        return x.reshape(flat // entry.channels, entry.channels, out).transpose(2, 1, 0).reshape(out, flat)
    return x


def _torch_shape(shape: tuple[int, ...], entry: Entry) -> tuple[int, ...]:
    return to_torch_layout(np.empty(shape, np.uint8), entry).shape


def _expected_shapes(cfg: ml_collections.ConfigDict, plan: list[Entry]) -> dict[str, tuple]:
    """torch name -> torch shape, from the Flax model's own variable shapes (`jax.eval_shape`)."""
    shapes = models.variable_shapes(cfg)
    out = {}
    for e in plan:
        node = shapes[e.collection]
        for key in e.path:
            node = node[key]
        out[e.torch_name] = _torch_shape(tuple(node.shape), e)
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _convert(state: Mapping[str, np.ndarray], plan: list[Entry], expected: dict[str, tuple],
             what: str) -> dict:
    names = set(state)
    planned = {e.torch_name for e in plan}
    unknown = sorted(n for n in names - planned if not n.endswith(".num_batches_tracked"))
    missing = sorted(planned - names)
    misshaped = sorted(f"{e.torch_name}: {tuple(np.shape(state[e.torch_name]))}, expected "
                       f"{expected[e.torch_name]}" for e in plan
                       if e.torch_name in names
                       and tuple(np.shape(state[e.torch_name])) != expected[e.torch_name])
    if unknown or missing or misshaped:
        raise ValueError(f"{what}: cannot convert the state dict; unknown keys {unknown}, "
                         f"missing keys {missing}, mis-shaped {misshaped}")
    variables: dict = {PARAMS: {}, BATCH_STATS: {}}
    for e in plan:
        x = np.asarray(state[e.torch_name], np.float32)
        _set(variables[e.collection], e.path, np.ascontiguousarray(to_flax_layout(x, e)))
    if not variables[BATCH_STATS]:
        del variables[BATCH_STATS]
    return variables


def merge(*trees: dict) -> dict:
    """Deep-merge nested dicts (e.g. FEN and parser variables); a leaf given twice is an error."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            elif key in out:
                raise ValueError(f"variable {key!r} given twice")
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def adaparse_fen_variables(state: Mapping[str, np.ndarray],
                           cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Official Personalized_FEN state dict -> {'params': {'fen'}, 'batch_stats': {'fen'}}."""
    cfg = cfg or models.model_config("adaparse")
    plan = fen_plan(cfg)
    return _convert(state, plan, _expected_shapes(cfg, plan), "AdaParse FEN (state_dict_cnn)")


def adaparse_parser_variables(state: Mapping[str, np.ndarray],
                              cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Official ParsingNet state dict -> {'params': {'parser'}}."""
    cfg = cfg or models.model_config("adaparse")
    plan = parser_plan(cfg)
    return _convert(state, plan, _expected_shapes(cfg, plan), "AdaParse parser (state_dict_class)")


def adaparse_variables(fen_state: Mapping[str, np.ndarray], parser_state: Mapping[str, np.ndarray],
                       cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Both official AdaParse state dicts -> the full Flax variables of `models.AdaParse`."""
    return merge(adaparse_fen_variables(fen_state, cfg), adaparse_parser_variables(parser_state, cfg))


def renet_fen_variables(state: Mapping[str, np.ndarray],
                        cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Official RE-Net DnCNN state dict -> {'params': {'fen'}, 'batch_stats': {'fen'}}."""
    cfg = cfg or models.model_config("renet")
    plan = renet_fen_plan(cfg)
    return _convert(state, plan, _expected_shapes(cfg, plan), "RE-Net FEN (state_dict_cnn)")


def to_torch(variables: Mapping, plan: list[Entry]) -> dict[str, np.ndarray]:
    """Flax variables -> a state dict with the official names and torch layouts (plan order).

    `num_batches_tracked` is not tracked by the Flax models and is left out.
    """
    out = {}
    for e in plan:
        node = variables[e.collection]
        for key in e.path:
            node = node[key]
        out[e.torch_name] = np.ascontiguousarray(to_torch_layout(np.asarray(node), e))
    return out


# What the pickle of an official checkpoint (a torch.save of state dicts) may import: tensors and
# their storages, ordered dicts. Anything else (os.system, builtins.eval, ...) is code to run.
_SAFE_PICKLE_MODULES = ("collections", "torch", "numpy")


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a torch.save file: `<name>/data.pkl` of the zip format, or the whole legacy file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
            return z.read(names[0])
    return path.read_bytes()


def check_pickle_imports(path: str | Path) -> None:
    """Raise UnsafeCheckpointError if the checkpoint's pickle imports anything but tensors and dicts.

    Reads the opcodes only (`pickletools`), never unpickles: works without torch.
    """
    path = Path(path)
    data = _pickle_bytes(path)
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):
                module, name = arg.split(" ", 1)
            elif op.name == "STACK_GLOBAL":
                module, name = (strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?")
            else:
                continue
            if module.split(".")[0] not in _SAFE_PICKLE_MODULES:
                raise UnsafeCheckpointError(
                    f"refusing to open {path}: its pickle imports {module}.{name}, which would run "
                    "code; official checkpoints hold only tensors (torch.load weights_only=True)")
    except (ValueError, IndexError) as e:
        if isinstance(e, UnsafeCheckpointError):
            raise
        raise ValueError(f"{path}: not a readable pickle ({e})") from e


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle would import (and so could run) arbitrary code."""


def load_official_checkpoint(path: str | Path, arch: str = "adaparse",
                             cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Read an official `.pickle` checkpoint (torch.save of {'state_dict_cnn', 'state_dict_class'}).

    AdaParse: returns the full model variables. RE-Net: returns the FEN's variables only (the
    official RE-Net parser has another head layout; see the module docstring).
    Opened with `torch.load(weights_only=True)` after `check_pickle_imports`: a file whose pickle
    would run code is refused (UnsafeCheckpointError), with or without torch installed.
    Needs torch (`pip install -e .[torch]`), imported only here.
    """
    path = Path(path)
    if path.is_file():
        check_pickle_imports(path)  # before anything else, torch or not
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading official .pickle checkpoints needs PyTorch: "
                          "pip install -e .[torch]") from e
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing to open {path}: torch.load(weights_only=True) "
                                    f"rejected it ({str(e).splitlines()[0]})") from e
    for key in ("state_dict_cnn",) + (("state_dict_class",) if arch == "adaparse" else ()):
        if key not in ckpt:
            raise ValueError(f"{path}: no {key!r} in the checkpoint (keys: {sorted(ckpt)})")

    def numpy_state(sd):
        return {k: v.detach().cpu().numpy() for k, v in sd.items()}

    if arch == "adaparse":
        return adaparse_variables(numpy_state(ckpt["state_dict_cnn"]),
                                  numpy_state(ckpt["state_dict_class"]), cfg)
    if arch == "renet":
        return renet_fen_variables(numpy_state(ckpt["state_dict_cnn"]), cfg)
    raise ValueError(f"config field arch={arch!r}; expected one of {models.ARCHS}")
