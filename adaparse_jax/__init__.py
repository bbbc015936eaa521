"""adaparse-jax: model parsing (AdaParse, RE-Net) in JAX/Flax."""

from adaparse_jax import targets

__version__ = "0.1.0"
