"""adaparse-jax: model parsing (AdaParse, RE-Net) in JAX/Flax.

    run = adaparse_jax.load("runs/re116_s1")   # see adaparse_jax.runs
"""

from adaparse_jax import targets

__version__ = "0.1.0"


def load(workdir, step=None):
    """`adaparse_jax.runs.load`: a trained run's model, variables and pure `apply` (imported on use,
    so `import adaparse_jax` stays light)."""
    from adaparse_jax import runs

    return runs.load(workdir, step)


__all__ = ["load", "targets"]
