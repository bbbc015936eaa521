"""A tiny end-to-end run on a dataset it generates itself (no user data): the smoke test of every
config's machinery on a CPU.

  python train.py --config configs/tiny.py --workdir runs/tiny          # AdaParse, tiny widths
  python train.py --config configs/tiny.py:renet --workdir runs/tiny_renet
  python eval.py --workdir runs/tiny runs/tiny_renet --out runs/tiny_results

It writes a dataset into <workdir>/dataset (the synthetic zoo's tiny size once `adaparse_jax.zoo`
provides its build command, else the small generated dataset of `adaparse_jax.data.synthetic`: 8
generators, 16 images of 32x32 each, 2 test splits), decodes it into <workdir>/cache, holds one
training generator out for validation, trains the tiny model for 2 epochs with checkpoints and
resume, and evaluates the best validation checkpoint on split 1's test generators.

Arg (comma-separated): 'adaparse' (default) or 'renet'; 'synthetic' forces the generated fallback
dataset, 'zoo' requires the zoo.

Expected runtime on the project's 2-core CPU: see README ("Training and evaluation on RE-116") for
the measured times. Paper numbers: none; the tiny model and data are for testing the code, not for
reproducing results.
"""

import importlib.util

from adaparse_jax import models, train_lib


def zoo_ready() -> bool:
    """True once the synthetic zoo has its command line (`python -m adaparse_jax.zoo build`)."""
    try:
        return importlib.util.find_spec("adaparse_jax.zoo.__main__") is not None
    except ImportError:
        return False


def get_config(arg=None):
    opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = opts - {"adaparse", "renet", "synthetic", "zoo"}
    if unknown:
        raise ValueError(f"configs/tiny.py: unknown option(s) {sorted(unknown)}; "
                         "use adaparse|renet and synthetic|zoo")
    config = train_lib.default_config()
    config.model = models.model_config("renet" if "renet" in opts else "adaparse", size="tiny")
    if "synthetic" in opts or ("zoo" not in opts and not zoo_ready()):
        config.data.generate = "synthetic"
    else:
        config.data.generate = "zoo:tiny"
    config.data.num_val = 1
    config.data.eval_batch_size = 16
    config.split = 1
    config.batch_size = 16
    config.num_epochs = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 2
    return config
