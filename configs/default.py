"""The default training config: AdaParse, full size, official hyperparameters, no dataset chosen.

Every field, with its meaning, is listed in `adaparse_jax.training.default_config`; the other
configs in this directory start from it and override a few fields. This one needs the dataset on
the command line:

  python train.py --config configs/default.py --workdir runs/mine \
      --config.data.images=data/RE116 --config.data.labels=data/labels --config.split=1

Expected runtime and paper numbers: as configs/re116.py (the same run).
"""

from adaparse_jax import train as training


def get_config(arg=None):
    del arg  # no variants
    return training.default_config()
