"""Decode once: every image to 64x64 RGB uint8, in memory-mapped shards with a JSON manifest.

Decoding is the official transform's first half. torchvision's ImageFolder loader opens each file
with PIL and calls `.convert("RGB")`; `transforms.Resize((64, 64))` then calls
`Image.resize((64, 64), BILINEAR)`, which in PIL is bilinear with antialiasing (the filter support
grows with the downscale factor). `decode_image` does exactly these two calls, so the cache holds
the pixels the official code feeds to `ToTensor()`. Consequences of `.convert("RGB")`, kept as is:

- RGBA / LA / transparent palette images lose their alpha channel (no compositing on a background);
- CMYK uses PIL's plain CMYK->RGB conversion (no colour profile);
- 16-bit grayscale ("I;16*", "I") is *clipped* to 0..255, so most 16-bit images turn white. The
  named option `high_bit_depth="scale"` maps 0..65535 to 0..255 instead (round(v / 257)), which
  keeps the picture; "clip" (the default) reproduces the official input.

Files without an image extension, empty files and files PIL cannot decode (corrupt, truncated,
unsupported) are skipped and recorded with their reason; they never stop a run (the official
loader would crash on them).

Storage: one `.npy` shard per (generator, chunk of at most `shard_size` files), uint8
[n, size, size, 3], read with `np.load(mmap_mode="r")`; a sibling `.json` lists the source files it
was made from (path, size, mtime), the kept paths and the skipped files. Fixed-size records make a
memory map the fastest reader (no per-record deserialisation, as ArrayRecord would need), the whole
cache loads with one read per shard for the device-resident mode, and numpy alone can open it.

Resuming: a shard whose `.json` exists and lists the same source files is not redone, so an
interrupted run continues where it stopped and a rerun on an unchanged tree does no work. A cache
made with other settings (size, filter, 16-bit rule, Pillow version, source root, generator names,
shard size) is refused with the differences listed, or rebuilt with `rebuild=True`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from adaparse_jax import atomic
from adaparse_jax.data import re116
from adaparse_jax.data.reader import (  # noqa: F401 - the cache's read side, re-exported
    FORMAT_VERSION,
    MANIFEST,
    SETTINGS,
    SHARDS,
    UNLABELLED,
    BatchReader,
    Cache,
    CacheError,
)

HIGH_BIT_DEPTH_MODES = ("clip", "scale")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class EmptyGeneratorsError(re116.DatasetError):
    """Prepare finished, but every file of some generators was skipped; `manifest` says why."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """How images are decoded into the cache.

    Attributes:
      size: output side in pixels (the official transform: 64).
      high_bit_depth: "clip" (PIL's `.convert("RGB")`, the official input) or "scale" (16-bit
        grayscale mapped to 8 bits by round(v / 257)).
      shard_size: most files per shard (the unit of parallel work and of resuming).
    """

    size: int = 64
    high_bit_depth: str = "clip"
    shard_size: int = 1000

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.high_bit_depth not in HIGH_BIT_DEPTH_MODES:
            raise ValueError(
                f"high_bit_depth must be one of {HIGH_BIT_DEPTH_MODES}, got {self.high_bit_depth!r}"
            )
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")


def to_rgb(image: Image.Image, high_bit_depth: str = "clip") -> Image.Image:
    """`image.convert("RGB")`, except 16-bit grayscale under high_bit_depth="scale"."""
    if high_bit_depth == "scale" and image.mode in _SIXTEEN_BIT:
        v = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((v + 128) // 257).astype(np.uint8), "L")
    return image.convert("RGB")


def _decode(path, size: int, high_bit_depth: str) -> tuple[np.ndarray, str]:
    with Image.open(path) as image:
        mode = image.mode
        rgb = to_rgb(image, high_bit_depth)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR), np.uint8), mode


def decode_image(path: str | os.PathLike, size: int = 64, high_bit_depth: str = "clip") -> np.ndarray:
    """Decode one file as the official transform does: RGB, PIL bilinear (antialiased) resize.

    Returns uint8 [size, size, 3]. Raises whatever PIL raises for a bad file.
    """
    return _decode(path, size, high_bit_depth)[0]


def _decode_or_reason(source: re116.SourceFile, root: Path, size: int, high_bit_depth: str):
    """(pixels, source mode, None) for a good file, (None, None, reason) for a skipped one."""
    if not source.is_image:
        return None, None, f"not an image extension ({', '.join(re116.IMAGE_EXTENSIONS)})"
    if source.size == 0:
        return None, None, "empty file (0 bytes)"
    if source.size < 0:
        return None, None, "cannot stat the file (dangling link?)"
    try:
        return (*_decode(root / source.path, size, high_bit_depth), None)
    except Exception as e:  # noqa: BLE001 - any decoder failure only skips this file
        return None, None, f"cannot decode: {type(e).__name__}: {e}"


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    key: str
    row: int
    generator: str | None
    folder: str
    files: tuple[re116.SourceFile, ...]
    root: str
    out_dir: str
    size: int
    high_bit_depth: str


def _files_record(files: Iterable[re116.SourceFile]) -> list[list]:
    return [[f.path, f.size, f.mtime_ns] for f in files]


def _run_shard(task: _ShardTask) -> dict:
    """Decode one shard and write its .npy, then its .json (the completion mark)."""
    root = Path(task.root)
    images, kept, skipped, modes = [], [], [], collections.Counter()
    for source in task.files:
        pixels, mode, reason = _decode_or_reason(source, root, task.size, task.high_bit_depth)
        if reason is not None:
            skipped.append({"path": source.path, "reason": reason})
        else:
            images.append(pixels)
            kept.append(source.path)
            modes[mode] += 1
    array = np.stack(images) if images else np.zeros((0, task.size, task.size, 3), np.uint8)
    out = Path(task.out_dir)
    atomic.write(out / f"{task.key}.npy", lambda f: np.save(f, array))
    meta = {
        "key": task.key,
        "row": task.row,
        "generator": task.generator,
        "folder": task.folder,
        "count": len(kept),
        "files": _files_record(task.files),
        "paths": kept,
        "skipped": skipped,
        "modes": dict(sorted(modes.items())),
    }
    atomic.write_text(out / f"{task.key}.json", json.dumps(meta))
    return meta


def _settings(
    settings: PrepareSettings, source_root: Path, names: Sequence[str] | None, dataset: str
) -> dict:
    return {
        "format": FORMAT_VERSION,
        "size": settings.size,
        "resample": "PIL bilinear (antialiased): Image.resize((size, size), Image.BILINEAR)",
        "convert": "PIL Image.convert('RGB') (alpha dropped, CMYK plain conversion)",
        "high_bit_depth": settings.high_bit_depth,
        "pillow": PIL.__version__,
        "shard_size": settings.shard_size,
        "source_root": str(source_root.resolve()),
        "dataset": dataset,
        "labelled": names is not None,
        "names": list(names) if names is not None else None,
    }


def _check_out_dir(out: Path, settings: dict, rebuild: bool) -> None:
    """Refuse a cache made with other settings (or a foreign directory); clear it on rebuild."""
    settings_file = out / SETTINGS
    if out.exists() and not out.is_dir():
        raise CacheError(f"cache path {out} exists and is not a directory")
    if not out.exists():
        return
    ours = {MANIFEST, SETTINGS, SHARDS}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if not settings_file.exists():
        if foreign:
            raise CacheError(
                f"cache directory {out} is not empty and holds no cache ({', '.join(foreign[:10])}"
                f"{', ...' if len(foreign) > 10 else ''}); choose an empty or new directory"
            )
        return
    old = json.loads(settings_file.read_text())
    diff = [f"{k}: cache has {old.get(k)!r}, requested {v!r}" for k, v in settings.items() if old.get(k) != v]
    diff += [f"{k}: cache has {old[k]!r}, requested nothing" for k in old if k not in settings]
    if not diff:
        return
    if not rebuild:
        shown = [d if len(d) < 300 else d[:300] + "..." for d in diff]
        raise CacheError(
            f"cache {out} was made with other settings:\n"
            + "\n".join(f"  - {d}" for d in shown)
            + "\nuse another output directory, or rebuild it (--rebuild / rebuild=True)"
        )
    for name in (MANIFEST, SETTINGS):
        (out / name).unlink(missing_ok=True)
    if (out / SHARDS).is_dir():
        for p in (out / SHARDS).iterdir():
            if p.suffix in (".npy", ".json") or ".tmp" in p.name:
                p.unlink()


def _finished_shard(shard_dir: Path, key: str) -> dict | None:
    """The meta of a shard whose .npy and .json (written last) both exist."""
    meta_path = shard_dir / f"{key}.json"
    if not meta_path.exists() or not (shard_dir / f"{key}.npy").exists():
        return None
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None


def _shard_done(shard_dir: Path, task: _ShardTask) -> dict | None:
    meta = _finished_shard(shard_dir, task.key)
    return meta if meta is not None and meta.get("files") == _files_record(task.files) else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _plan(
    tree_files: Sequence[tuple[int, str | None, str, Sequence[re116.SourceFile]]],
    root: Path,
    shard_dir: Path,
    settings: PrepareSettings,
) -> list[_ShardTask]:
    tasks = []
    for row, name, folder, files in tree_files:
        stem = f"{row:04d}-{_safe(name)}" if name is not None else "unlabelled"
        chunks = [files[i : i + settings.shard_size] for i in range(0, len(files), settings.shard_size)] or [
            []
        ]
        for k, chunk in enumerate(chunks):
            tasks.append(
                _ShardTask(
                    f"{stem}-{k:04d}",
                    row,
                    name,
                    folder,
                    tuple(chunk),
                    str(root),
                    str(shard_dir),
                    settings.size,
                    settings.high_bit_depth,
                )
            )
    return tasks


def _execute(
    tasks: Sequence[_ShardTask], shard_dir: Path, workers: int, progress: bool
) -> tuple[list[dict], int]:
    """Run the pending shards (in `workers` processes); return every shard's meta and how many ran."""
    from tqdm.auto import tqdm

    metas: dict[str, dict] = {}
    pending = []
    for t in tasks:
        done = _shard_done(shard_dir, t)
        if done is not None:
            metas[t.key] = done
        else:
            pending.append(t)
    # Finished shards of generators outside this plan (from an earlier run with a `generators`
    # subset) stay in the cache; everything else not planned is stale and removed.
    planned_rows, keys = {t.row for t in tasks}, {t.key for t in tasks}
    others = {}
    for p in shard_dir.glob("*.json"):
        key = p.name[: -len(".json")]
        meta = None if key in keys else _finished_shard(shard_dir, key)
        if meta is not None and meta.get("row") not in planned_rows:
            others[key] = meta
    keep = {f"{k}{ext}" for k in keys | set(others) for ext in (".npy", ".json")}
    for p in shard_dir.iterdir():
        if p.name not in keep:
            p.unlink()
    bar = tqdm(total=sum(len(t.files) for t in pending), unit="img", desc="prepare", disable=not progress)
    try:
        if workers <= 1 or len(pending) <= 1:
            for t in pending:
                metas[t.key] = _run_shard(t)
                bar.update(len(t.files))
        else:
            # spawn, not fork: the caller may have started JAX's threads, which fork can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(pending)), mp_context=ctx) as pool:
                futures = {pool.submit(_run_shard, t): t for t in pending}
                for fut in concurrent.futures.as_completed(futures):
                    meta = fut.result()
                    metas[meta["key"]] = meta
                    bar.update(len(futures[fut].files))
    finally:
        bar.close()
    metas.update(others)
    return [metas[k] for k in sorted(metas)], len(pending)


def _manifest(settings: dict, metas: Sequence[dict], seconds: float, ran: int) -> dict:
    gens: dict = {}
    skipped = []
    for m in metas:
        g = gens.setdefault(
            m["key"].rsplit("-", 1)[0],
            {
                "name": m["generator"],
                "row": m["row"],
                "folder": m["folder"],
                "files": 0,
                "images": 0,
                "skipped": 0,
                "modes": collections.Counter(),
            },
        )
        g["files"] += len(m["files"])
        g["images"] += m["count"]
        g["skipped"] += len(m["skipped"])
        g["modes"].update(m["modes"])
        skipped.extend(
            {"path": s["path"], "generator": m["generator"], "reason": s["reason"]} for s in m["skipped"]
        )
    for g in gens.values():
        g["modes"] = dict(sorted(g["modes"].items()))
    return {
        "format": FORMAT_VERSION,
        "complete": True,
        "settings": settings,
        "totals": {
            "files": sum(g["files"] for g in gens.values()),
            "images": sum(g["images"] for g in gens.values()),
            "skipped": len(skipped),
        },
        "generators": list(gens.values()),
        "skipped": skipped,
        "shards": [{"key": m["key"], "row": m["row"], "count": m["count"]} for m in metas],
        "prepare": {
            "seconds": round(seconds, 3),
            "shards_run": ran,
            "shards_reused": len(metas) - ran,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def _prepare(
    tree_files,
    root: Path,
    out: Path,
    settings_dict: dict,
    settings: PrepareSettings,
    workers: int | None,
    rebuild: bool,
    progress: bool,
) -> dict:
    start = time.perf_counter()
    out = Path(out)
    _check_out_dir(out, settings_dict, rebuild)
    shard_dir = out / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until every shard is written
    atomic.write_json(out / SETTINGS, settings_dict)
    tasks = _plan(tree_files, root, shard_dir, settings)
    workers = (os.cpu_count() or 1) if workers is None else workers
    metas, ran = _execute(tasks, shard_dir, workers, progress)
    manifest = _manifest(settings_dict, metas, time.perf_counter() - start, ran)
    atomic.write_json(out / MANIFEST, manifest)
    return manifest


def prepare_dataset(
    dataset: re116.Dataset,
    out: str | os.PathLike,
    *,
    settings: PrepareSettings = PrepareSettings(),
    workers: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    generators: Sequence[str] | None = None,
) -> dict:
    """Validate the tree of `dataset`, then decode every image into the cache at `out`.

    Args:
      generators: prepare only these (default: all generators of the dataset); generators that an
        earlier run with the same settings prepared stay in the cache, so subsets add up.
      workers: processes (default: all CPU cores); 1 runs in this process.
      rebuild: clear a cache made with other settings instead of refusing it.

    Returns the manifest (also written to `out/manifest.json`). Raises re116.DatasetError before any
    work for a bad tree, and after writing the manifest if a generator kept no image.
    """
    tree = re116.validate_tree(dataset, generators)
    tree_files = [
        (dataset.row(n), n, tree.folders[n], tree.files[n]) for n in dataset.names if n in tree.folders
    ]
    settings_dict = _settings(settings, tree.root, dataset.names, dataset.name)
    run = {"workers": workers, "rebuild": rebuild, "progress": progress}
    manifest = _prepare(tree_files, tree.root, Path(out), settings_dict, settings, **run)
    empty = [g["name"] for g in manifest["generators"] if g["images"] == 0]
    if empty:
        raise EmptyGeneratorsError(
            f"every file was skipped for generator(s) {', '.join(empty)}; see the "
            f"'skipped' list in {Path(out) / MANIFEST}",
            manifest,
        )
    return manifest


def prepare_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    settings: PrepareSettings = PrepareSettings(),
    workers: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> dict:
    """Decode a plain folder of images (recursively, no labels) into a cache; generator ids are -1."""
    folder = Path(folder)
    if not folder.is_dir():
        raise re116.DatasetError(f"image folder {folder} does not exist (or is not a directory)")
    files = re116.list_files(folder.parent, folder.name)
    if not any(f.is_image for f in files):
        raise re116.DatasetError(
            f"image folder {folder} holds no file with an image extension "
            f"({', '.join(re116.IMAGE_EXTENSIONS)}); {len(files)} other files"
        )
    settings_dict = _settings(settings, folder.parent, None, folder.name)
    run = {"workers": workers, "rebuild": rebuild, "progress": progress}
    tree_files = [(UNLABELLED, None, folder.name, files)]
    return _prepare(tree_files, folder.parent, Path(out), settings_dict, settings, **run)
