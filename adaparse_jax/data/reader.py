"""The read side of a prepared cache (`data.cache` writes it): random access to its uint8 images
by record index, and batched reads for the input pipeline."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARDS = "shards"
UNLABELLED = -1  # generator id of every record of an unlabelled folder


class CacheError(RuntimeError):
    """A cache directory that cannot be used or written as asked."""


class Cache:
    """Read side of a prepared cache: random access to uint8 [H, W, 3] images by record index.

    Records are ordered by generator row, then source path. `generator[i]` is record i's row in
    `names` (UNLABELLED for an unlabelled folder). Also a grain random-access source: `len(cache)`
    and `cache[i]` -> {"image": uint8 [H, W, 3], "generator": int32}.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            state = (
                "is incomplete (no manifest.json: prepare was interrupted or failed); run prepare again"
                if (self.path / SETTINGS).exists()
                else "does not exist or is not a cache (no manifest.json)"
            )
            raise CacheError(f"cache {self.path} {state}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION or not self.manifest.get("complete"):
            raise CacheError(
                f"cache {self.path} has format {self.manifest.get('format')!r}; this code reads "
                f"format {FORMAT_VERSION}: prepare it again with --rebuild"
            )
        self.settings = self.manifest["settings"]
        self.size = int(self.settings["size"])
        self.names = tuple(self.settings["names"]) if self.settings["names"] is not None else None
        shards = self.manifest["shards"]
        self._keys = [s["key"] for s in shards]
        counts = np.asarray([s["count"] for s in shards], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.generator = np.repeat(np.asarray([s["row"] for s in shards], np.int32), counts)
        self._maps: list | None = None
        self._paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):  # memory maps are reopened in each worker process
        state = dict(self.__dict__)
        state["_maps"] = None
        state["_paths"] = None
        return state

    def _shards(self) -> list:
        if self._maps is None:
            maps = []
            for key, n in zip(self._keys, np.diff(self._offsets), strict=True):
                file = self.path / SHARDS / f"{key}.npy"
                # A plain ndarray view of the map: fancy indexing a np.memmap is about twice as slow.
                maps.append(np.asarray(np.load(file, mmap_mode="r")) if n else None)
                if n and maps[-1].shape != (n, self.size, self.size, 3):
                    raise CacheError(
                        f"cache shard {file} has shape {maps[-1].shape}, manifest says "
                        f"{(int(n), self.size, self.size, 3)}: rebuild the cache"
                    )
            self._maps = maps
        return self._maps

    @property
    def paths(self) -> list[str]:
        """Source path of each record, relative to the source root (`settings["source_root"]`)."""
        if self._paths is None:
            paths = []
            for key in self._keys:
                paths.extend(json.loads((self.path / SHARDS / f"{key}.json").read_text())["paths"])
            self._paths = paths
        return self._paths

    def read(self, indices) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] for record indices in any order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"record index out of range 0..{len(self) - 1}")
        out = np.empty((indices.size, self.size, self.size, 3), np.uint8)
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        maps = self._shards()
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = maps[s][indices[sel] - self._offsets[s]]
        return out

    def __getitem__(self, index: int) -> dict:
        return {"image": self.read([index])[0], "generator": np.int32(self.generator[index])}

    def records(self, generators: Iterable[str] | None = None) -> np.ndarray:
        """Record indices (ascending) of the named generators; all records when None."""
        if generators is None:
            return np.arange(len(self), dtype=np.int64)
        if self.names is None:
            raise CacheError(
                f"cache {self.path} is unlabelled (a plain folder); it has no generators to select"
            )
        generators = list(generators)
        unknown = [g for g in generators if g not in self.names]
        if unknown:
            raise CacheError(f"cache {self.path} has no generator(s) {', '.join(unknown)}")
        rows = [self.names.index(g) for g in generators]
        counts = collections.Counter(self.generator.tolist())
        empty = [g for g, r in zip(generators, rows, strict=True) if counts.get(r, 0) == 0]
        if empty:
            raise CacheError(
                f"cache {self.path} holds no image of generator(s) {', '.join(empty)} "
                f"(not prepared, or every file was skipped)"
            )
        return np.flatnonzero(np.isin(self.generator, rows)).astype(np.int64)


class BatchReader:
    """Record positions -> a host batch {"image": uint8 [B, H, W, 3], "generator": int32 [B]}.

    The grain map of the input pipeline (picklable: the cache reopens its memory maps in each
    grain worker process).

    Args:
      cache: the cache to read.
      records: cache record index of each position.
      rows: label-table row of each cache generator id (empty: keep the cache's ids).
    """

    def __init__(self, cache: Cache, records: np.ndarray, rows: np.ndarray):
        self.cache, self.records, self.rows = cache, records, rows

    def __call__(self, positions: np.ndarray) -> dict:
        rec = self.records[positions]
        gen = self.cache.generator[rec]
        if self.rows.size:
            gen = self.rows[gen]
        return {"image": self.cache.read(rec), "generator": gen.astype(np.int32)}
