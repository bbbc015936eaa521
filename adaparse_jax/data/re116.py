"""RE-116 and RE-123 dataset descriptions: generator names, label tables, splits, validation.

A dataset is an image root with one folder per generator, the three official label tables and the
generator names in label-row order. Images map to label rows **by generator name** (through
`Dataset.names`), never by the sort order of the folders: torchvision's `ImageFolder` sorts by code
point while the label rows sort `_` as a space, so the official scripts give CONT_ENC, CONTRAGAN,
WGAN_DRA, WGAN_WC and WGANGP other generators' labels.

Variants:

  re116  116 generators (the shipped `resources/re116_models.txt`), label files
         ground_truth_net_116_15dim.npy, ground_truth_loss_116_9dim.npy (10 columns),
         ground_truth_loss_116_3dim.npy; 4 official test splits of 12 generators
         (`resources/re116_splits.json`), the other 104 train.
  re123  the 116 rows followed by 7 diffusion models (`resources/re123_diffusion.json`: ADM, ADM_G,
         DDPM, DDIM, LDM, STABLE_DIFFUSION, GLIDE), label files DM_net_arch.npy, DM_loss.npy,
         DM_loss_3dim.npy. The RE-Net release names the diffusion folders Z_1..Z_7, in that order; the
         folder aliases map them to the rows. Test splits as in the official adaparse_diff*.py
         scripts: 3 diffusion models each ({ADM, ADM_G, DDPM}, {DDPM, DDIM, LDM},
         {ADM_G, STABLE_DIFFUSION, GLIDE}, {DDIM, LDM, GLIDE}); every other generator of the 123
         (the 116 GANs/VAEs/... and the 4 remaining diffusion models) trains.

A directory with a `dataset.json` (see docs/ARCHITECTURE.md, "Dataset directory") describes any
other dataset in the same layout, e.g. the synthetic zoo.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from adaparse_jax import targets

RE116 = "re116"
RE123 = "re123"
VARIANTS = (RE116, RE123)
DISPLAY_NAMES = {RE116: "RE-116", RE123: "RE-123"}

# The official file names of the three label tables, per variant (the 10-column flag table of
# RE-116 is really named "..._9dim.npy").
LABEL_FILES: Mapping[str, Mapping[str, str]] = {
    RE116: {
        targets.NET_TABLE: "ground_truth_net_116_15dim.npy",
        targets.LOSS10_TABLE: "ground_truth_loss_116_9dim.npy",
        targets.LOSS3_TABLE: "ground_truth_loss_116_3dim.npy",
    },
    RE123: {
        targets.NET_TABLE: "DM_net_arch.npy",
        targets.LOSS10_TABLE: "DM_loss.npy",
        targets.LOSS3_TABLE: "DM_loss_3dim.npy",
    },
}

# What torchvision's ImageFolder accepts (compared lower-case); the official loaders never see
# other files, so they are skipped (and recorded) here too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DATASET_JSON = "dataset.json"
_DATASET_JSON_KEYS = {"name", "images", "names", "splits", "labels", "aliases"}


class DatasetError(ValueError):
    """A dataset description, label table or image tree that cannot be used as it is."""


class ExtraFoldersWarning(UserWarning):
    """Folders in the image root that belong to no generator of the dataset."""


def _resource_text(name: str) -> str:
    return resources.files("adaparse_jax.data").joinpath("resources", name).read_text()


def parse_names(text: str, source: str = "names") -> tuple[str, ...]:
    """Generator names, one per line (blank lines ignored); duplicates are an error."""
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{source}: generator names appear more than once: {', '.join(dup)}")
    if not names:
        raise DatasetError(f"{source}: no generator names")
    return names


def read_names(path: str | os.PathLike) -> tuple[str, ...]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"generator-name file {path} does not exist")
    return parse_names(path.read_text(), str(path))


def parse_splits(obj, source: str = "splits") -> dict[str, tuple[str, ...]]:
    """`{"test_splits": {"1": [names...], ...}}` -> {"1": (names...), ...}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("test_splits"), dict):
        raise DatasetError(f'{source}: expected {{"test_splits": {{"1": [generator names], ...}}}}')
    out = {}
    for key, names in obj["test_splits"].items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{source}: test split {key!r} is not a list of generator names")
        out[str(key)] = tuple(names)
    return out


def _read_json(path: Path, missing: str):
    if not path.is_file():
        raise DatasetError(f"{path} does not exist{missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e


def read_splits(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    return parse_splits(_read_json(Path(path), " (split file)"), str(path))


def _diffusion() -> dict:
    return json.loads(_resource_text("re123_diffusion.json"))


def variant_names(variant: str) -> tuple[str, ...]:
    """The shipped generator names of a variant, in label-row order."""
    names = parse_names(_resource_text("re116_models.txt"), "re116_models.txt")
    if variant == RE116:
        return names
    if variant == RE123:
        return names + tuple(_diffusion()["names"])
    raise DatasetError(f"unknown dataset variant {variant!r}; expected one of {VARIANTS}")


def variant_splits(variant: str) -> dict[str, tuple[str, ...]]:
    """The official test splits of a variant (4 each)."""
    if variant == RE116:
        return parse_splits(json.loads(_resource_text("re116_splits.json")), "re116_splits.json")
    if variant == RE123:
        return parse_splits(_diffusion(), "re123_diffusion.json")
    raise DatasetError(f"unknown dataset variant {variant!r}; expected one of {VARIANTS}")


def variant_aliases(variant: str) -> dict[str, str]:
    """Folder name -> generator name for folders not named after their generator."""
    return dict(_diffusion()["folder_aliases"]) if variant == RE123 else {}


def _listing(directory: Path) -> str:
    files = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    return ", ".join(files) if files else "(nothing)"


def find_label_files(labels_dir: str | os.PathLike, variant: str = "auto") -> tuple[str, dict[str, Path]]:
    """Locate the official label tables of `variant` ("auto": whichever complete set is present).

    Returns (variant, {table key: path}). A missing or misnamed file raises DatasetError listing the
    expected names, what the directory holds and the closest match for each missing name.
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DatasetError(f"label directory {labels_dir} does not exist (or is not a directory)")
    if variant not in ("auto",) + VARIANTS:
        raise DatasetError(f"unknown dataset variant {variant!r}; expected 'auto' or one of {VARIANTS}")
    present = {p.name for p in labels_dir.iterdir() if p.is_file()}
    candidates = VARIANTS if variant == "auto" else (variant,)
    for v in candidates:
        if all(f in present for f in LABEL_FILES[v].values()):
            return v, {k: labels_dir / f for k, f in LABEL_FILES[v].items()}
    # Nothing complete: explain against the variant that is closest to complete.
    best = max(candidates, key=lambda v: sum(f in present for f in LABEL_FILES[v].values()))
    missing = [f for f in LABEL_FILES[best].values() if f not in present]
    lines = [f"label directory {labels_dir} does not hold the {DISPLAY_NAMES[best]} label tables."]
    for v in candidates:
        lines.append(f"  expected ({DISPLAY_NAMES[v]}): {', '.join(LABEL_FILES[v].values())}")
    lines.append(f"  missing: {', '.join(missing)}")
    lines.append(f"  found in the directory: {_listing(labels_dir)}")
    spare = sorted(present - set(LABEL_FILES[best].values()))
    for m in missing:
        close = difflib.get_close_matches(m, spare, n=1, cutoff=0.6)
        if close:
            lines.append(f"  {close[0]} looks like a misnamed {m}: rename it if it is that table")
    if best == RE116 and LABEL_FILES[RE116][targets.LOSS10_TABLE] in missing:
        lines.append("  (the official 10-column loss-flag table is named ..._9dim.npy)")
    raise DatasetError("\n".join(lines))


def load_tables(files: Mapping[str, str | os.PathLike], names: Sequence[str]) -> np.ndarray:
    """Read the three tables, check them against `names`, return the [G, 28] label matrix."""
    tables = {}
    for key in targets.TABLE_COLUMNS:
        path = Path(files[key])
        if not path.is_file():
            raise DatasetError(
                f"label table {key!r}: file {path} does not exist; the directory "
                f"holds: {_listing(path.parent)}"
            )
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"label table {key!r}: cannot read {path}: {e}") from e
        try:
            targets.check_table(key, table, num_rows=len(names), source=str(path), names=names)
        except ValueError as e:
            raise DatasetError(str(e)) from e
        tables[key] = table
    return targets.label_matrix(tables)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled dataset: generators in label-row order, their labels, folders and test splits.

    Attributes:
      name: display name ("RE-116", "RE-123", or the dataset.json's).
      names: generator names; `names[i]` is row i of `labels`.
      labels: [G, 28] float32 label matrix, columns in `targets.LABEL_COLUMNS` order.
      images: the image root (one folder per generator).
      test_splits: split id -> names of its test generators.
      aliases: folder name -> generator name, for folders not named after their generator.
      label_files: table key -> the file the labels came from.
      variant: RE116, RE123, or "custom".
    """

    name: str
    names: tuple[str, ...]
    labels: np.ndarray
    images: Path
    test_splits: Mapping[str, tuple[str, ...]]
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    label_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    variant: str = "custom"

    def row(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise DatasetError(f"{self.name}: unknown generator {name!r}") from None

    def rows(self, names: Iterable[str]) -> np.ndarray:
        return np.asarray([self.row(n) for n in names], np.int32)

    def folder_names(self, name: str) -> tuple[str, ...]:
        """The folder names that may hold generator `name`: itself, then its aliases."""
        return (name,) + tuple(sorted(a for a, n in self.aliases.items() if n == name))


def _check_aliases(aliases: Mapping[str, str], names: Sequence[str], source: str) -> None:
    unknown = sorted(f"{a}->{n}" for a, n in aliases.items() if n not in names)
    if unknown:
        raise DatasetError(f"{source}: folder aliases point to unknown generators: {', '.join(unknown)}")


def load_dataset(
    path: str | os.PathLike | None = None,
    *,
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    names: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    variant: str = "auto",
    aliases: Mapping[str, str] | None = None,
) -> Dataset:
    """Describe a dataset, from a dataset.json (or its directory) or from RE-116/RE-123 parts.

    Args:
      path: a dataset.json or a directory holding one (the synthetic zoo writes these).
      images: image root, one folder per generator (RE-116 / RE-123 form).
      labels: directory with the official label tables.
      names: generator names in label-row order, one per line; the shipped names of the variant when
        None.
      splits: a splits.json; the shipped official splits of the variant when None.
      variant: "auto" (from the label files found), RE116 or RE123.
      aliases: extra folder name -> generator name entries (added to the variant's).

    Only the description and the labels are checked here; `validate_tree` checks the image folders.
    """
    if path is not None:
        if images is not None or labels is not None:
            raise DatasetError("give either a dataset.json path or images= and labels=, not both")
        return _load_dataset_json(Path(path), aliases or {})
    if images is None or labels is None:
        raise DatasetError("a dataset needs a dataset.json path, or both images= and labels=")
    variant, files = find_label_files(labels, variant)
    gen_names = read_names(names) if names is not None else variant_names(variant)
    matrix = load_tables(files, gen_names)
    all_aliases = {**variant_aliases(variant), **(aliases or {})}
    _check_aliases(all_aliases, gen_names, "aliases")
    return Dataset(
        name=DISPLAY_NAMES[variant],
        names=gen_names,
        labels=matrix,
        images=Path(images),
        test_splits=read_splits(splits) if splits is not None else variant_splits(variant),
        aliases=all_aliases,
        label_files={k: str(p) for k, p in files.items()},
        variant=variant,
    )


def _load_dataset_json(path: Path, extra_aliases: Mapping[str, str]) -> Dataset:
    if path.is_dir():
        path = path / DATASET_JSON
    desc = _read_json(path, f"; a dataset directory needs a {DATASET_JSON}")
    if not isinstance(desc, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    unknown = sorted(set(desc) - _DATASET_JSON_KEYS)
    missing = sorted({"images", "names", "labels"} - set(desc))
    if unknown or missing:
        raise DatasetError(
            f"{path}: "
            + "; ".join(
                ([f"unknown keys {unknown}"] if unknown else [])
                + ([f"missing keys {missing}"] if missing else [])
            )
            + f"; expected keys {sorted(_DATASET_JSON_KEYS)}"
        )
    base = path.parent
    label_desc = desc["labels"]
    if not isinstance(label_desc, dict) or set(label_desc) != set(targets.TABLE_COLUMNS):
        raise DatasetError(
            f"{path}: 'labels' must map exactly {sorted(targets.TABLE_COLUMNS)} to files, got {label_desc!r}"
        )
    gen_names = read_names(base / desc["names"])
    files = {k: base / f for k, f in label_desc.items()}
    matrix = load_tables(files, gen_names)
    splits = read_splits(base / desc["splits"]) if desc.get("splits") else {}
    all_aliases = {**dict(desc.get("aliases") or {}), **extra_aliases}
    _check_aliases(all_aliases, gen_names, str(path))
    return Dataset(
        name=str(desc.get("name") or base.name),
        names=gen_names,
        labels=matrix,
        images=base / desc["images"],
        test_splits=splits,
        aliases=all_aliases,
        label_files={k: str(p) for k, p in files.items()},
    )


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file under a generator folder: path relative to the image root, size and mtime."""

    path: str
    size: int
    mtime_ns: int

    @property
    def is_image(self) -> bool:
        return self.path.lower().endswith(IMAGE_EXTENSIONS)


def list_files(root: Path, folder: str) -> list[SourceFile]:
    """Every file under `root/folder`, recursively (as ImageFolder walks), sorted by path."""
    out = []
    top = root / folder
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames.sort()
        for f in filenames:
            full = Path(dirpath) / f
            try:
                st = full.stat()
            except OSError:  # a dangling link: keep it, decoding will record why it is skipped
                st = None
            out.append(
                SourceFile(
                    full.relative_to(root).as_posix(), st.st_size if st else -1, st.st_mtime_ns if st else 0
                )
            )
    out.sort(key=lambda s: s.path)
    return out


@dataclasses.dataclass(frozen=True)
class Tree:
    """A validated image tree: for each generator (label-row order) its folder and files."""

    root: Path
    folders: Mapping[str, str]
    files: Mapping[str, tuple[SourceFile, ...]]


def _suggest(name: str, pool: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(pool), n=1, cutoff=0.75)
    if not close:
        close = [p for p in pool if p.lower() == name.lower()]
    return f" (folder {close[0]!r} exists: rename it or add an alias)" if close else ""


def validate_tree(dataset: Dataset, generators: Sequence[str] | None = None) -> Tree:
    """Check the image folders of `dataset` before any work; raise one DatasetError listing all problems.

    Problems: a generator named by the labels or a split with no folder; a split naming an unknown
    generator; a generator folder without any image file; two folders for one generator. Folders
    that belong to no generator give an ExtraFoldersWarning listing them.

    Args:
      generators: the generators to require (default: all of `dataset.names`).
    """
    root = Path(dataset.images)
    if not root.is_dir():
        raise DatasetError(f"{dataset.name}: image root {root} does not exist (or is not a directory)")
    problems = []
    unknown_split = sorted(
        {f"{n} (split {k})" for k, ns in dataset.test_splits.items() for n in ns if n not in dataset.names}
    )
    if unknown_split:
        problems.append("test splits name unknown generators: " + ", ".join(unknown_split))
    required = list(dataset.names if generators is None else generators)
    unknown_req = [n for n in required if n not in dataset.names]
    if unknown_req:
        problems.append("unknown generators requested: " + ", ".join(unknown_req))
    on_disk = sorted(p.name for p in root.iterdir() if p.is_dir())
    disk_set = set(on_disk)
    folders, missing, ambiguous = {}, [], []
    for name in required:
        if name not in dataset.names:
            continue
        found = [f for f in dataset.folder_names(name) if f in disk_set]
        if not found:
            missing.append(name + _suggest(name, disk_set - set(dataset.names) - set(dataset.aliases)))
        elif len(found) > 1:
            ambiguous.append(f"{name}: {', '.join(found)}")
        else:
            folders[name] = found[0]
    if missing:
        problems.append(f"{len(missing)} generator(s) have no folder in {root}: " + ", ".join(missing))
    if ambiguous:
        problems.append("generators with more than one folder: " + "; ".join(ambiguous))
    files, empty = {}, []
    for name, folder in folders.items():
        listed = tuple(list_files(root, folder))
        if not any(f.is_image for f in listed):
            empty.append(f"{name} ({root / folder}: {len(listed)} files, none with an image extension)")
        files[name] = listed
    if empty:
        problems.append("generator folders without any image: " + ", ".join(empty))
    known = set(dataset.names) | set(dataset.aliases)
    extra = [f for f in on_disk if f not in known]
    if extra:  # also before an error: a misnamed folder shows up on both lists
        warnings.warn(
            f"{dataset.name}: {len(extra)} folder(s) in {root} belong to no generator and are "
            f"ignored: {', '.join(extra)}",
            ExtraFoldersWarning,
            stacklevel=2,
        )
    if problems:
        raise DatasetError(
            f"{dataset.name} image tree {root} cannot be used:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return Tree(root=root, folders=folders, files=files)


@dataclasses.dataclass(frozen=True)
class Split:
    """Generator names (label-row order) of one experiment's train, validation and test sets."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def make_split(dataset: Dataset, split: str | int, num_val: int = 0, val_seed: int = 0) -> Split:
    """One official split: its test generators, the others train, `num_val` of them held out.

    The validation generators are drawn from the training generators by `val_seed` alone
    (deterministic), for model selection that never looks at the test generators.
    """
    key = str(split)
    if key not in dataset.test_splits:
        raise DatasetError(f"{dataset.name}: unknown split {key!r}; splits are {sorted(dataset.test_splits)}")
    test = set(dataset.test_splits[key])
    unknown = sorted(test - set(dataset.names))
    if unknown:
        raise DatasetError(f"{dataset.name}: split {key} names unknown generators: {', '.join(unknown)}")
    train = [n for n in dataset.names if n not in test]
    if not 0 <= num_val < len(train):
        raise DatasetError(f"{dataset.name}: cannot hold out {num_val} of {len(train)} training generators")
    held = set(np.random.default_rng(val_seed).choice(len(train), size=num_val, replace=False).tolist())
    return Split(
        train=tuple(n for i, n in enumerate(train) if i not in held),
        val=tuple(n for i, n in enumerate(train) if i in held),
        test=tuple(n for n in dataset.names if n in test),
    )
