"""A tiny end-to-end run on a dataset it generates itself (no user data): the smoke test of every
config's machinery on a CPU.

  python train.py --config configs/tiny.py --workdir runs/tiny          # AdaParse, tiny widths
  python train.py --config configs/tiny.py:renet --workdir runs/tiny_renet
  python eval.py --workdir runs/tiny runs/tiny_renet --out runs/tiny_results

It writes a dataset into <workdir>/dataset (by default the generated dataset of
`adaparse_jax.data.synthetic`: 16 generators, 24 images of 32x32 each, 4 test splits of 2
generators, written in under a second), decodes it into <workdir>/cache, holds one training
generator out for validation, trains the tiny model for 4 epochs (13 generators x 24 images: 19
steps of 16 per epoch) at learning rate 1e-3 with checkpoints, and evaluates the best validation
checkpoint on the split's test generators.

Arg (comma-separated): 'adaparse' (default) or 'renet'; 'zoo' uses the synthetic zoo's tiny size
instead (`python -m adaparse_jax.zoo build --size tiny`: real generator networks, 24 generators x
32 images, built in about 2 minutes on the project's 2-core CPU (README, "Synthetic zoo"); training
then runs 34 steps per epoch), 'synthetic' names the default explicitly.

Expected runtime on the project's 2-core CPU: see README ("Training and evaluation on RE-116") for
the measured times. Paper numbers: none; the tiny model and data are for testing the code, not for
reproducing results.
"""

from adaparse_jax import models
from adaparse_jax import train as training


def get_config(arg=None):
    opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = opts - {"adaparse", "renet", "synthetic", "zoo"}
    if unknown:
        raise ValueError(f"configs/tiny.py: unknown option(s) {sorted(unknown)}; "
                         "use adaparse|renet and synthetic|zoo")
    config = training.default_config()
    config.model = models.model_config("renet" if "renet" in opts else "adaparse", size="tiny")
    if "zoo" in opts and "synthetic" in opts:
        raise ValueError("configs/tiny.py: choose one of 'zoo' and 'synthetic'")
    config.data.generate = "zoo:tiny" if "zoo" in opts else "synthetic"
    config.data.num_val = 1
    config.data.eval_batch_size = 16
    config.split = 1
    config.batch_size = 16
    config.num_epochs = 4
    # Tiny-only: at the official 1e-4 the ~80 steps a CPU smoke run affords move little more than
    # the output biases, so every method makes the same decisions; 1e-3 moves the models further
    # apart (the tiny widths still cannot learn the task in minutes: this config tests the code).
    config.optimizer.learning_rate = 1e-3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 2
    return config
