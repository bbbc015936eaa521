"""The 25 RE-116 parsing targets and the 3 coarse loss groups, as one table.

Everything that depends on the targets (parser heads, losses, class weights, metrics, report tables,
label gathering) is generated from `HEADS` and `GROUPS` below; nothing else in the package numbers
targets by hand.

Fingerprint / head order (AdaParse personalises one fingerprint per head, in this order):

  0-8    continuous architecture counts (min-max normalised, L2 loss, L1 metric)
  9-14   discrete architecture choices (class-weighted cross-entropy, macro F1)
  15-24  loss-function flags (binary; gated by their coarse group)

The coarse loss groups are extra heads on the mean of their flags' features. Their labels come from
the published 3-column table, while the gating (and the official class weights) follows the flag
membership below: flags 1-5, 6-9 and 10. The published group table is the OR of flags {1-4}, {5-9},
{10} instead (see shared/reference/README.md); both facts are kept as given.

Label matrix: the 28 label columns are `LABEL_COLUMNS = HEADS + GROUPS`; `label_matrix` builds a
[G, 28] float32 table (one row per generator) from the three official tables, and `split_labels`
turns gathered rows back into a name -> array dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

CONTINUOUS = "continuous"
DISCRETE = "discrete"
FLAG = "flag"
GROUP = "group"

# The three official label tables, by the key used throughout the package, and their file names.
NET_TABLE = "net"  # ground_truth_net_116_15dim.npy: 9 continuous + 6 discrete columns
LOSS10_TABLE = "loss10"  # ground_truth_loss_116_9dim.npy: 10 flag columns (the name says 9)
LOSS3_TABLE = "loss3"  # ground_truth_loss_116_3dim.npy: 3 coarse-group columns
TABLE_COLUMNS = {NET_TABLE: 15, LOSS10_TABLE: 10, LOSS3_TABLE: 3}


@dataclasses.dataclass(frozen=True)
class Target:
    """One parsing target.

    Attributes:
      name: stable identifier, used for parameter paths, metric names and report rows.
      title: human-readable name for tables.
      kind: CONTINUOUS, DISCRETE, FLAG or GROUP.
      num_classes: classes of a discrete/flag/group head; 1 for a continuous target.
      table: which official label table holds the label (NET_TABLE, LOSS10_TABLE, LOSS3_TABLE).
      column: the column of that table.
      group: for a FLAG, the name of the coarse group that gates it.
      members: for a GROUP, the names of the flags whose features it averages and which it gates.
    """

    name: str
    title: str
    kind: str
    num_classes: int
    table: str
    column: int
    group: str | None = None
    members: tuple[str, ...] = ()

    @property
    def is_classification(self) -> bool:
        return self.kind != CONTINUOUS


def _continuous(name: str, title: str, column: int) -> Target:
    return Target(name, title, CONTINUOUS, 1, NET_TABLE, column)


def _discrete(name: str, title: str, num_classes: int, column: int) -> Target:
    return Target(name, title, DISCRETE, num_classes, NET_TABLE, column)


# (flag name, title, group); the flag's column in the 10-column table is its position here.
_FLAGS = (
    ("l1", "L1", "loss_group1"),
    ("l2", "L2", "loss_group1"),
    ("mse", "MSE", "loss_group1"),
    ("mmd", "MMD", "loss_group1"),
    ("ls", "LS", "loss_group1"),
    ("wgan", "WGAN", "loss_group2"),
    ("kl", "KL", "loss_group2"),
    ("adversarial", "Adversarial", "loss_group2"),
    ("hinge", "Hinge", "loss_group2"),
    ("ce", "CE", "loss_group3"),
)

HEADS: tuple[Target, ...] = (
    _continuous("layers", "# layers", 0),
    _continuous("conv_layers", "# conv layers", 1),
    _continuous("fc_layers", "# FC layers", 2),
    _continuous("pooling_layers", "# pooling layers", 3),
    _continuous("norm_layers", "# normalisation layers", 4),
    _continuous("filters", "# filters", 5),
    _continuous("blocks", "# blocks", 6),
    _continuous("layers_per_block", "# layers per block", 7),
    _continuous("parameters", "# parameters", 8),
    _discrete("normalization", "Normalisation type", 4, 9),
    _discrete("nonlin_block", "Non-linearity in blocks", 4, 10),
    _discrete("nonlin_last", "Non-linearity in last layer", 4, 11),
    _discrete("upsampling", "Up-sampling type", 2, 12),
    _discrete("skip", "Skip connection", 2, 13),
    _discrete("downsampling", "Down-sampling", 2, 14),
) + tuple(
    Target(name, title, FLAG, 2, LOSS10_TABLE, column, group=group)
    for column, (name, title, group) in enumerate(_FLAGS)
)

GROUPS: tuple[Target, ...] = tuple(
    Target(
        group,
        f"Loss group {column + 1}",
        GROUP,
        2,
        LOSS3_TABLE,
        column,
        members=tuple(name for name, _, g in _FLAGS if g == group),
    )
    for column, group in enumerate(dict.fromkeys(g for _, _, g in _FLAGS))
)

NUM_HEADS = len(HEADS)  # 25: one personalised fingerprint per head in AdaParse
LABEL_COLUMNS: tuple[Target, ...] = HEADS + GROUPS
NUM_LABEL_COLUMNS = len(LABEL_COLUMNS)  # 28

BY_NAME: Mapping[str, Target] = {t.name: t for t in LABEL_COLUMNS}
CONTINUOUS_TARGETS = tuple(t for t in HEADS if t.kind == CONTINUOUS)
DISCRETE_TARGETS = tuple(t for t in HEADS if t.kind == DISCRETE)
FLAG_TARGETS = tuple(t for t in HEADS if t.kind == FLAG)
CLASSIFICATION_TARGETS = DISCRETE_TARGETS + GROUPS + FLAG_TARGETS


def head_index(name: str) -> int:
    """Position of a head (and of its personalised fingerprint) in `HEADS`."""
    for i, t in enumerate(HEADS):
        if t.name == name:
            return i
    raise KeyError(f"unknown head {name!r}; heads are {[t.name for t in HEADS]}")


def column_index(name: str) -> int:
    """Position of a target's label in the [G, 28] label matrix."""
    for i, t in enumerate(LABEL_COLUMNS):
        if t.name == name:
            return i
    raise KeyError(f"unknown target {name!r}; targets are {list(BY_NAME)}")


def group_members_indices(group: Target) -> tuple[int, ...]:
    """Head indices of the flags a group averages and gates."""
    return tuple(head_index(m) for m in group.members)


CONTINUOUS_COLUMNS = tuple(column_index(t.name) for t in CONTINUOUS_TARGETS)


def check_table(name: str, table: np.ndarray, num_rows: int | None = None, source: str = "",
                names: Sequence[str] | None = None) -> None:
    """Raise ValueError if a label table has the wrong shape or invalid values.

    Names the table (and `source`, e.g. its file), the offending row and column, and the row's
    generator when `names` (the generator names in row order) is given.
    """
    where = f" ({source})" if source else ""
    expected_cols = TABLE_COLUMNS[name]
    if table.ndim != 2 or table.shape[1] != expected_cols:
        raise ValueError(
            f"label table {name!r}{where} has shape {table.shape}; expected [rows, {expected_cols}]"
        )
    if num_rows is not None and table.shape[0] != num_rows:
        raise ValueError(
            f"label table {name!r}{where} has {table.shape[0]} rows but {num_rows} generator names"
        )
    for t in LABEL_COLUMNS:
        if t.table != name:
            continue
        col = table[:, t.column]
        bad = ~np.isfinite(col)
        if t.kind == CONTINUOUS:
            bad |= (col < 0) | (col > 1)
        else:
            bad |= (col < 0) | (col >= t.num_classes) | (col != np.round(col))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            generator = f" (generator {names[row]})" if names is not None and row < len(names) else ""
            raise ValueError(
                f"label table {name!r}{where}: row {row}{generator}, column {t.column} ({t.name}) has invalid "
                f"value {col[row]!r}; expected "
                + ("a number in [0, 1]" if t.kind == CONTINUOUS else f"a class id in 0..{t.num_classes - 1}")
            )


def label_matrix(tables: Mapping[str, np.ndarray]) -> np.ndarray:
    """Stack the three official tables into one [G, 28] float32 matrix in `LABEL_COLUMNS` order."""
    rows = {len(tables[k]) for k in TABLE_COLUMNS}
    if len(rows) != 1:
        raise ValueError(f"label tables disagree on the number of rows: "
                         f"{ {k: len(tables[k]) for k in TABLE_COLUMNS} }")
    for k in TABLE_COLUMNS:
        check_table(k, np.asarray(tables[k]))
    return np.stack(
        [np.asarray(tables[t.table], np.float64)[:, t.column] for t in LABEL_COLUMNS], axis=1
    ).astype(np.float32)


def tables_from_matrix(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of `label_matrix`: the three official tables (float64, official column order)."""
    matrix = np.asarray(matrix)
    out = {k: np.zeros((matrix.shape[0], n), np.float64) for k, n in TABLE_COLUMNS.items()}
    for i, t in enumerate(LABEL_COLUMNS):
        out[t.table][:, t.column] = matrix[:, i]
    return out


def split_labels(matrix) -> dict:
    """[..., 28] label rows -> {'continuous': [..., 9] float, name: [...] int32 class ids}.

    Works on NumPy and JAX arrays alike (used inside jitted steps).
    """
    out = {CONTINUOUS: matrix[..., CONTINUOUS_COLUMNS[0]: CONTINUOUS_COLUMNS[-1] + 1]}
    for t in CLASSIFICATION_TARGETS:
        out[t.name] = matrix[..., column_index(t.name)].astype(np.int32)
    return out


def class_weights(matrix: np.ndarray, rows: Sequence[int] | None = None,
                  official_group_counts: bool = True) -> dict[str, np.ndarray]:
    """Class weights N / N_c for every classification target, counted over generators.

    Args:
      matrix: [G, 28] label matrix (one row per generator).
      rows: generators to count over (e.g. the training generators); all rows when None. Counting
        over all 116 generators reproduces the official literals; counting over the training
        generators only is the honest choice (the official literals also count test generators).
      official_group_counts: the official weights of a coarse group count the OR of its member flags
        (flags 1-5, 6-9, 10), not the group table's column; True reproduces that, False counts the
        group column itself.

    Returns:
      name -> float32 [num_classes]. A class absent from the counted rows gets weight 0 (it cannot
      occur as a label among those rows, so its weight never enters the loss).
    """
    m = np.asarray(matrix, np.float64)
    if rows is not None:
        m = m[np.asarray(rows)]
    n = m.shape[0]
    out = {}
    for t in CLASSIFICATION_TARGETS:
        if t.kind == GROUP and official_group_counts:
            y = np.max(m[:, [column_index(f) for f in t.members]], axis=1)
        else:
            y = m[:, column_index(t.name)]
        counts = np.bincount(y.astype(np.int64), minlength=t.num_classes)[: t.num_classes]
        w = np.where(counts > 0, n / np.maximum(counts, 1), 0.0)
        out[t.name] = w.astype(np.float32)
    return out
