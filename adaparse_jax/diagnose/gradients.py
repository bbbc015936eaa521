"""Loss terms' gradient norms per parameter group, and Adam's effective step ratio (sections 1, 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaparse_jax import losses, targets
from adaparse_jax.diagnose.subject import DiagnoseError, batch_key, flat

# A parameter belongs to the group of the first prefix here that its path starts with, else to its
# top-level name (RE-Net: 'fen', 'parser'; AdaParse: 'parser').
PARAM_GROUPS = (
    ("fen/shared/", "fen/shared"),  # stem + blocks before the hypernetwork: the extractor trunk
    ("fen/hypernet/", "fen/hypernet"),
    ("fen/middle/", "fen/middle+adaptive"),  # the personalised blocks
    ("fen/adaptive/", "fen/middle+adaptive"),
)
# The rows of section 1 besides the single terms: the sums' gradients.
CONSTRAINTS = "constraints (4)"
CROSS_ENTROPIES = f"cross-entropies ({len(targets.CLASSIFICATION_TARGETS)})"
TOTAL = "total"
ALL = "all"  # the norm over every parameter, computed on its own (not from the groups)


def group_of(path: str) -> str:
    """The group of a parameter path such as 'fen/shared/block1/conv/kernel' (`PARAM_GROUPS`)."""
    for prefix, group in PARAM_GROUPS:
        if path.startswith(prefix):
            return group
    return path.split("/", 1)[0]



def group_rank(group: str) -> tuple[int, str]:
    """Network order: the groups of `PARAM_GROUPS` in its order, then the others alphabetically
    (the FEN before the parser)."""
    table = list(dict.fromkeys(g for _, g in PARAM_GROUPS))
    return (table.index(group) if group in table else len(table), group)


def group_names(params) -> list[str]:
    """The groups present in a parameter tree, in network order."""
    return sorted({group_of(p) for p in flat(params)}, key=group_rank)


def group_norms(tree) -> dict[str, jax.Array]:
    """{group: L2 norm of the tree's leaves in that group}, plus `ALL`: the norm of the whole tree
    (computed from the leaves, not from the group norms)."""
    sq: dict[str, Any] = {}
    for path, leaf in flat(tree).items():
        g = group_of(path)
        sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    out = {g: jnp.sqrt(v) for g, v in sq.items()}
    out[ALL] = optax.tree.norm(tree)
    return out


def term_gradients(loss_fn, params, batch_stats, batches: Sequence[dict], *, step: int,
                   seed: int = 0) -> dict:
    """Every loss term's value and gradient norms per parameter group, on the mean over `batches`.

    Args:
      loss_fn: `(variables, batch, *, step, dropout_rng) -> (total, (terms, updates))`, e.g.
        `train.training_loss` with its model, labels, class weights and loss config bound.
      params, batch_stats: the model variables.

    Returns:
      values: {term: mean over batches}; norms: {row: {group: norm, ALL: norm}} with a row per
      term and the rows CONSTRAINTS, CROSS_ENTROPIES and TOTAL (the sums' gradients);
      ce_sq: pytree like params, the mean over batches of the squared gradient of the
      cross-entropies' sum (what `adam_step_ratio` reads).
    """
    keys = [batch_key(seed, i) for i in range(len(batches))]
    # The term names in total_loss's order (without 'total'), from one abstract evaluation.
    names = [n for n in jax.eval_shape(
        lambda: loss_fn({"params": params, "batch_stats": batch_stats}, batches[0], step=step,
                        dropout_rng=keys[0])[1][0]) if n != "total"]

    def term_loss(p, batch, key, weights):
        _, (terms, _) = loss_fn({"params": p, "batch_stats": batch_stats}, batch, step=step,
                                dropout_rng=key)
        vec = jnp.stack([terms[n] for n in names])
        return jnp.dot(weights, vec), vec

    # One compilation for every term: the term is chosen by a one-hot weight vector.
    grad_fn = jax.jit(jax.grad(term_loss, has_aux=True))
    norms_fn = jax.jit(group_norms)
    add = jax.jit(lambda a, b, s: jax.tree.map(lambda x, y: x + s * y, a, b))
    square_mean = jax.jit(lambda trees: jax.tree.map(lambda *xs: sum(x * x for x in xs) / len(xs),
                                                     *trees))
    ce_names = {t.name for t in targets.CLASSIFICATION_TARGETS}
    families = {CONSTRAINTS: set(losses.CONSTRAINT_TERMS), CROSS_ENTROPIES: ce_names,
                TOTAL: set(names)}
    acc = {f: None for f in families}
    ce_by_batch: list[Any] = [None] * len(batches)
    values, norms = {}, {}
    inv = 1.0 / len(batches)
    for name in names:
        weights = jnp.asarray(np.eye(len(names), dtype=np.float32)[names.index(name)])
        mean = None
        value = 0.0
        for i, (batch, key) in enumerate(zip(batches, keys, strict=True)):
            g, vec = grad_fn(params, batch, key, weights)
            value += float(vec[names.index(name)]) * inv
            mean = jax.tree.map(lambda x: x * inv, g) if mean is None else add(mean, g, inv)
            if name in ce_names:
                ce_by_batch[i] = g if ce_by_batch[i] is None else add(ce_by_batch[i], g, 1.0)
        values[name] = value
        norms[name] = {k: float(v) for k, v in norms_fn(mean).items()}
        for fam, members in families.items():
            if name in members:
                acc[fam] = mean if acc[fam] is None else add(acc[fam], mean, 1.0)
    for fam, tree in acc.items():
        norms[fam] = {k: float(v) for k, v in norms_fn(tree).items()}
    values[TOTAL] = sum(values[n] for n in names)
    return {"values": values, "norms": norms, "ce_sq": square_mean(ce_by_batch)}


def adam_moments(opt_state):
    """The `optax.ScaleByAdamState` inside an optimiser state (raises if there is none or several)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise DiagnoseError(f"the optimiser state holds {len(found)} Adam states; expected one")
    return found[0]


def adam_step_ratio(grad_sq, opt_state, *, b2: float, eps: float,
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> dict:
    """Per group, quantiles of sqrt(grad_sq) / (sqrt(v_hat) + eps) over the group's parameters.

    v_hat = nu / (1 - b2^count), Adam's bias-corrected second moment. With `grad_sq` the mean
    squared per-batch gradient of some losses, a ratio of 1 is a parameter whose Adam steps those
    losses alone would make about the learning rate long; 0.01 is one they move 100x less.

    Returns {'count': Adam's step count, 'groups': {group: {'q10', 'median', 'q90', 'parameters'}}}.
    """
    adam = adam_moments(opt_state)
    count = int(adam.count)
    if count == 0:
        raise DiagnoseError("Adam's step count is 0: no second moments yet")
    correction = 1.0 - b2 ** count
    g_flat, v_flat = flat(jax.device_get(grad_sq)), flat(jax.device_get(adam.nu))
    if set(g_flat) != set(v_flat):
        raise DiagnoseError("the gradient and Adam's moments have different parameter trees")
    per_group: dict[str, list] = {}
    for path, g2 in g_flat.items():
        v_hat = np.asarray(v_flat[path], np.float64) / correction
        ratio = np.sqrt(np.asarray(g2, np.float64)) / (np.sqrt(v_hat) + eps)
        per_group.setdefault(group_of(path), []).append(ratio.ravel())
    groups = {}
    for g, parts in sorted(per_group.items(), key=lambda kv: group_rank(kv[0])):
        r = np.concatenate(parts)
        q = np.quantile(r, quantiles)
        groups[g] = {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]),
                     "parameters": int(r.size)}
    return {"count": count, "groups": groups}

