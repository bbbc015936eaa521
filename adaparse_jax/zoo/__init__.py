"""The synthetic generator zoo: an offline model-parsing benchmark in the RE-116 layout.

Generators drawn from the RE-116 schema (`schema`), built as Flax networks (`generators`), trained
briefly on crops of real photographs (`photos`) with recipes that set the 10 loss flags
(`recipes`), and sampled into image folders with label tables (`build`: its settings and their
hash in `settings`, one generator per worker process in `worker`). CLI:

    python -m adaparse_jax.zoo build --size tiny|demo|bench --out DIR [--untrained] [--seed S] [--workers N]

Submodules import JAX lazily where they can, so `schema` and `photos` stay light.
"""

from adaparse_jax.zoo.build import build_zoo
from adaparse_jax.zoo.settings import SIZES, ZooConfig, zoo_config

__all__ = ["SIZES", "ZooConfig", "build_zoo", "zoo_config"]
