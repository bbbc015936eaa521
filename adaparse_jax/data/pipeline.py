"""Batches from a prepared cache: a grain pipeline, and a device-resident mode with the same batches.

Which records form each batch is decided in one place, `batch_indices`:

  training    grain.MapDataset.range(n).seed(seed).shuffle().batch(B, drop_remainder=True)
  evaluation  grain.MapDataset.range(n).batch(B)            (in order, last batch partial)

then `.repeat(num_epochs)`. grain's batch keeps every batch inside one epoch and its shuffle draws
a new permutation per epoch (its seed, derived from `seed`, plus the epoch), so global batch k
is step k % S of epoch k // S (S = steps per epoch; a training epoch drops its last n % B
records).

Two ways to turn these index batches into image batches:

- mode="grain": a grain map reads each index batch from the memory-mapped cache (in `num_workers`
  processes with `mp_prefetch`), and the batches are put on the device ahead of use (`prefetch`).
- mode="device": the selected records are uploaded once ([n, 64, 64, 3] uint8: RE-116 is about
  1.4 GB); each epoch's index table [S, B] is uploaded once and every batch is gathered on the
  device. The next epoch's table is computed on a background thread.

Both read the same index batches, so for the same seed they yield identical batches, and a
`Loader` state {"epoch", "step"} saved from one mode restores in the other.

Several processes (`adaparse_jax.parallel`): when the grain loader's `sharding` spans several
processes' devices, each process reads only the rows of every global batch that its own devices
hold (the same index batches, so the global batch is the single-process one) and the batch is
assembled across processes (`parallel.global_batch`). The device-resident mode is single-process.

Batches are `{"image": uint8 [B, H, W, 3], "generator": int32 [B]}` on the device; `generator` is the
row of the label table (`names` order). `normalize` and `gather_labels` run on the device.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags

from adaparse_jax import parallel, targets
from adaparse_jax.data.cache import BatchReader, Cache

MEAN = 0.6490  # the official Normalize((0.6490,) * 3, (0.1269,) * 3)
STD = 0.1269
MODES = ("grain", "device")


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., H, W, 3] -> (x / 255 - 0.6490) / 0.1269 in `dtype` (computed in float32).

    The same arithmetic as torchvision's ToTensor() then Normalize(), in float32.
    """
    x = images.astype(jnp.float32) / 255.0
    return ((x - MEAN) / STD).astype(dtype)


def put_labels(matrix: np.ndarray) -> jax.Array:
    """Upload a [G, 28] label matrix once; batches carry only generator rows."""
    matrix = np.asarray(matrix, np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != targets.NUM_LABEL_COLUMNS:
        raise ValueError(f"label matrix has shape {matrix.shape}; expected [G, {targets.NUM_LABEL_COLUMNS}]")
    return jnp.asarray(matrix)


def gather_labels(label_table: jax.Array, generator: jax.Array) -> dict:
    """Labels of a batch, gathered on the device: `targets.split_labels(label_table[generator])`."""
    return targets.split_labels(label_table[generator])


def batch_indices(
    num_records: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True
) -> grain.MapDataset:
    """The one definition of batch order: a MapDataset of int64 [B] record-position batches.

    Index k >= len (one epoch) addresses later epochs: each reshuffled with grain's per-epoch seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(
            f"{num_records} records make no batch of {batch_size} (drop_remainder={drop_remainder})"
        )
    return ds


def _label_rows(cache: Cache, names: Sequence[str] | None) -> np.ndarray:
    """Map cache generator ids to rows of `names` (-1 where a cache generator is not in `names`)."""
    if cache.names is None or names is None:
        n = len(cache.names) if cache.names is not None else 0
        return np.arange(n, dtype=np.int32)
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index.get(name, -1) for name in cache.names], np.int32)


class _TakeRows:
    """Index batch -> the positions of this process's rows of it (a picklable grain map)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return positions[self.rows]


def _prefetch_to_device(iterator, size: int, sharding, global_size: int | None = None) -> Iterator[dict]:
    """Keep `size` batches in flight to the device (device_put is asynchronous). `global_size`:
    the batches are this process's rows of global batches of that size."""
    queue = collections.deque()
    for batch in iterator:
        # Plain copies of grain workers' shared-memory arrays: device_put may alias them on CPU,
        # which keeps every segment alive until exit.
        batch = {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}
        queue.append(jax.device_put(batch, sharding) if global_size is None
                     else parallel.global_batch(batch, sharding, global_size))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


@jax.jit
def _take(images, generator, table, step):
    idx = table[step]
    return {"image": jnp.take(images, idx, axis=0), "generator": jnp.take(generator, idx, axis=0)}


@jax.jit
def _take_indices(images, generator, idx):
    return {"image": jnp.take(images, idx, axis=0), "generator": jnp.take(generator, idx, axis=0)}


class Loader:
    """Device batches of one set of generators, with a checkpointable position.

    Args:
      cache: a prepared `Cache`.
      generators: generator names to read (e.g. a split's train list); all records when None.
      batch_size: images per batch.
      seed: shuffle seed (training).
      train: shuffle per epoch and drop each epoch's last partial batch; False: one pass in order,
        last batch partial.
      num_epochs: epochs to yield (None: endless); evaluation defaults to 1.
      mode: "grain" (host reads, worker processes) or "device" (whole selection in device memory).
      num_workers: grain worker processes (mode="grain"); 0 reads in this process.
      read_threads, read_buffer: grain ReadOptions (threads and batches read ahead per process).
      prefetch: batches kept in flight to the device (mode="grain").
      names: the label table's generator order; `generator` in batches are rows of it (default: the
        cache's names).
      sharding: passed to `jax.device_put`: the batches' placement in mode="grain" (e.g. a
        batch-sharded NamedSharding), the resident arrays' in mode="device". A sharding over
        several processes' devices (mode="grain", train=True only): this process reads its rows of
        each batch (`parallel.local_rows`).

    State: `get_state()` -> {"epoch", "step", ...}; `set_state(state)` makes the next batch the one
    that followed when the state was taken, in either mode and with any worker count.
    """

    def __init__(
        self,
        cache: Cache,
        generators: Sequence[str] | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        train: bool = True,
        num_epochs: int | None = None,
        mode: str = "grain",
        num_workers: int = 0,
        read_threads: int = 2,
        read_buffer: int = 8,
        prefetch: int = 2,
        names: Sequence[str] | None = None,
        sharding=None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cache = cache
        self.records = cache.records(generators)
        rows = _label_rows(cache, names)
        if rows.size and (rows[np.unique(cache.generator[self.records])] < 0).any():
            absent = sorted({cache.names[g] for g in np.unique(cache.generator[self.records]) if rows[g] < 0})
            raise ValueError(
                f"generators {', '.join(absent)} of cache {cache.path} are not in the label names"
            )
        self._rows = rows
        self.batch_size, self.seed, self.train, self.mode = batch_size, seed, train, mode
        self.num_epochs = num_epochs if num_epochs is not None or train else 1
        self.num_workers, self.read_threads, self.read_buffer = num_workers, read_threads, read_buffer
        self.prefetch, self.sharding = prefetch, sharding
        # Rows of each batch this process reads: all of them, unless the batch spans processes.
        self._local_rows = None
        if sharding is not None and not sharding.is_fully_addressable:
            if mode != "grain" or not train:
                raise ValueError("a sharding over several processes' devices needs mode='grain' and "
                                 f"train=True (got mode={mode!r}, train={train}): the device-resident "
                                 "mode and evaluation passes run in one process")
            self._local_rows = parallel.local_rows(sharding, batch_size)
        self._index = batch_indices(
            len(self.records), batch_size, seed=seed, shuffle=train, drop_remainder=train
        )
        self.steps_per_epoch = len(self._index)
        self._full_steps = len(self.records) // batch_size  # eval's partial batch is handled apart
        self._next = 0
        self._iter = None
        self._grain_iter = None
        self._resident = None
        self._tables: dict[int, concurrent.futures.Future] = {}
        self._pool = None

    # -- order -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches in one epoch."""
        return self.steps_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Record positions (into `records`) of epoch `epoch`'s full batches: int32 [S_full, B]."""
        base = epoch * self.steps_per_epoch
        rows = [self._index[base + s] for s in range(self._full_steps)]
        return np.stack(rows).astype(np.int32) if rows else np.zeros((0, self.batch_size), np.int32)

    def _stop(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    # -- grain path ------------------------------------------------------------------------------

    def grain_dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain pipeline from global batch `start`: index batches -> cache reads (host numpy)."""
        ds = self._index.repeat(self.num_epochs)
        if start:
            ds = ds[start:]
        if self._local_rows is not None:
            ds = ds.map(_TakeRows(self._local_rows))
        ds = ds.map(BatchReader(self.cache, self.records, self._rows))
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.read_buffer)
        )
        if self.num_workers > 0:
            # grain 0.2.x reads an absl flag when starting workers and fails if the program never
            # parsed flags (google/grain#1355, fixed upstream); parsed defaults are what it wants.
            if not absl_flags.FLAGS.is_parsed():
                absl_flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return it

    def _grain_batches(self, start: int) -> Iterator[dict]:
        self._grain_iter = iter(self.grain_dataset(start))
        return _prefetch_to_device(self._grain_iter, self.prefetch, self.sharding,
                                   None if self._local_rows is None else self.batch_size)

    # -- device-resident path --------------------------------------------------------------------

    def resident_arrays(self) -> tuple[jax.Array, jax.Array]:
        """(images uint8 [n, H, W, 3], generator int32 [n]) of the selected records, on the device."""
        if self._resident is None:
            gen = self.cache.generator[self.records]
            if self._rows.size:
                gen = self._rows[gen]
            self._resident = (
                jax.device_put(self.cache.read(self.records), self.sharding),
                jax.device_put(gen.astype(np.int32), self.sharding),
            )
        return self._resident

    def _table(self, epoch: int) -> jax.Array:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch-indices")
        for e in (epoch, epoch + 1):  # the next epoch's permutation is computed while this one runs
            if e not in self._tables and (self.num_epochs is None or e < self.num_epochs):
                self._tables[e] = self._pool.submit(lambda e=e: jax.device_put(self.epoch_indices(e)))
        for e in [e for e in self._tables if e < epoch]:
            del self._tables[e]
        return self._tables[epoch].result()

    def _device_batches(self, start: int) -> Iterator[dict]:
        images, generator = self.resident_arrays()
        stop = self._stop()
        k = start
        while stop is None or k < stop:
            epoch, step = divmod(k, self.steps_per_epoch)
            if step < self._full_steps:
                yield _take(images, generator, self._table(epoch), np.int32(step))
            else:
                idx = self._index[k].astype(np.int32)
                yield _take_indices(images, generator, jax.device_put(idx))
            k += 1

    # -- iteration and state ---------------------------------------------------------------------

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = (self._grain_batches if self.mode == "grain" else self._device_batches)(self._next)
        batch = next(self._iter)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        epoch, step = divmod(self._next, self.steps_per_epoch)
        return {
            "epoch": epoch,
            "step": step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_records": len(self.records),
            "train": self.train,
        }

    def set_state(self, state: dict) -> None:
        for key in ("seed", "batch_size", "num_records", "train"):
            mine = self.get_state()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    "it cannot continue that sequence"
                )
        self._close_iter()
        self._next = int(state["epoch"]) * self.steps_per_epoch + int(state["step"])

    def reset(self) -> None:
        """Start again from the first batch (e.g. for another evaluation pass)."""
        self.set_state({"epoch": 0, "step": 0})

    def _close_iter(self) -> None:
        if self._grain_iter is not None and hasattr(self._grain_iter, "close"):
            self._grain_iter.close()
        self._grain_iter = None
        self._iter = None

    def close(self) -> None:
        self._close_iter()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
