"""RE-116 data: dataset descriptions and splits (`re116`), the decoded cache (`cache`), and the
grain / device-resident input pipeline (`pipeline`, imported on first use since it loads JAX)."""

from adaparse_jax.data import cache, re116
from adaparse_jax.data.cache import (
    Cache,
    CacheError,
    PrepareSettings,
    decode_image,
    prepare_dataset,
    prepare_folder,
)
from adaparse_jax.data.re116 import (
    Dataset,
    DatasetError,
    ExtraFoldersWarning,
    Split,
    load_dataset,
    make_split,
    validate_tree,
)

_LAZY = {"pipeline", "Loader", "normalize", "gather_labels", "put_labels", "batch_indices"}

__all__ = [
    "cache",
    "re116",
    "Cache",
    "CacheError",
    "PrepareSettings",
    "decode_image",
    "prepare_dataset",
    "prepare_folder",
    "Dataset",
    "DatasetError",
    "ExtraFoldersWarning",
    "Split",
    "load_dataset",
    "make_split",
    "validate_tree",
    *sorted(_LAZY),
]


def __getattr__(name):
    # The pipeline imports JAX; `prepare` and its worker processes only need re116 and cache.
    if name in _LAZY:
        import importlib

        pipeline = importlib.import_module("adaparse_jax.data.pipeline")
        return pipeline if name == "pipeline" else getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
