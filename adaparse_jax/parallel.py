"""Data parallelism with `jax.sharding`: the same jitted step, a batch sharded over devices.

    mesh = parallel.data_mesh()                        # 1-D mesh, axis 'data', every device
    state = parallel.replicate(state, mesh)            # params, BatchNorm statistics, Adam moments
    step = training.make_train_step(model, tx, ...)   # unchanged
    state, metrics = step(state, parallel.shard_batch(batch, mesh))

Nothing in the model or the step knows about devices. `jax.jit` partitions a function by the
shardings of its arguments (GSPMD): with the batch split on its leading axis and everything else
replicated, every device runs its slice of the batch, and each reduction over the batch (the loss
means, the gradient sums and the BatchNorm statistics) becomes a cross-device all-reduce. So the
BatchNorm statistics are those of the global batch, as in the single-device run (and in the
official code), not per-device statistics: the sharded step computes the same function as the
single-device step, up to the order of floating-point sums.

Fused steps (`make_train_step(..., fused_steps=K)`) take batches stacked as [K, B, ...]; their
sharding splits axis 1 (`batch_sharding(mesh, fused_steps=K)`).

Several processes (one per host, JAX's multi-controller runtime): `initialize` starts
`jax.distributed`; then `jax.devices()` lists every process's devices and the same mesh spans them
all. Every process runs the same program on the same replicated state; each holds only the rows
of a global batch that its own devices hold (`local_rows`) and `global_batch` assembles the
global array from them, so the step sees the batch a single process would have built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of the default backend)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, batch statistics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, fused_steps: int = 1) -> NamedSharding:
    """Split the batch axis over 'data': axis 0 of [B, ...], axis 1 of fused [K, B, ...] batches."""
    if fused_steps < 1:
        raise ValueError(f"fused_steps must be >= 1, got {fused_steps}")
    spec = PartitionSpec(DATA_AXIS) if fused_steps == 1 else PartitionSpec(None, DATA_AXIS)
    return NamedSharding(mesh, spec)


def initialize(**kwargs) -> bool:
    """`jax.distributed.initialize(**kwargs)` once per process (no kwargs: the cluster's environment,
    e.g. SLURM's, says everything); False when it had already run. It must come before anything
    touches a device."""
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes the files every process would otherwise write."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_copy(tree: Any) -> Any:
    """This process's copy of a replicated pytree, on its first device: what single-process code
    (validation) runs on while the state spans several processes."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def local_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """Rows of a global [batch_size, ...] batch that this process's devices hold, in order (int64).

    `jax.make_array_from_process_local_data` takes exactly these rows, in this order."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(local: Any, sharding: NamedSharding, batch_size: int) -> Any:
    """This process's rows (`local_rows`) of a batch -> the global arrays [batch_size, ...], split
    over every process's devices as `sharding` says."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (batch_size, *np.shape(x)[1:])), local)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless the global batch splits evenly over the mesh's devices."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} does not split over {n} devices; use a multiple "
                         f"of {n} (config field batch_size) or fewer devices")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (e.g. a `training.TrainState`) on every device of `mesh`.

    Over several processes each process gives its own copy (the same values: the same seeded
    init, the same tables), which goes through the host: `jax.device_put` accepts no array of
    one process's devices for a sharding over all of them."""
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def shard_batch(batch: Any, mesh: Mesh, fused_steps: int = 1) -> Any:
    """Place a batch (host or device arrays) split over the mesh's devices along its batch axis.

    A batch already on the devices is resharded there (a device-resident loader's gathered batch,
    say); a batch already sharded this way is returned as it is.
    """
    axis = 0 if fused_steps == 1 else 1
    for leaf in jax.tree_util.tree_leaves(batch):
        if np.ndim(leaf) <= axis:
            raise ValueError(f"batch leaf of shape {np.shape(leaf)} has no batch axis {axis} "
                             f"(fused_steps={fused_steps})")
        check_batch_size(np.shape(leaf)[axis], mesh)
    return jax.device_put(batch, batch_sharding(mesh, fused_steps))
