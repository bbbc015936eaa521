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


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless the global batch splits evenly over the mesh's devices."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} does not split over {n} devices; use a multiple "
                         f"of {n} (config field batch_size) or fewer devices")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (e.g. a `training.TrainState`) on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


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
