"""RE-Net (DnCNN-17 FEN + parsing network) on RE-116, trained like configs/re116.py.

  python train.py --config configs/renet_re116.py --workdir runs/renet_s1 --config.split=1
  ... --config.split=2 / 3 / 4
  python eval.py --workdir 'runs/re116_s*' 'runs/renet_s*' --out results/re116

The same data, optimiser (Adam 1e-4, weight decay 1e-4, batch 16, 20 epochs), loss weights and
class weights as the AdaParse config; only `model.arch` differs (one fingerprint per image, every
head reads it). The Random G.T. baseline is `--config.random_gt=True` on either config.

Expected runtime: not measured on a GPU in this project yet (see BENCHMARKS.md). Arithmetic: about
14.6 GFLOP per training image (docs: DESIGN, "Cost"), ~2.1 M training images per split = ~3e16 FLOP.

Paper numbers: see the RE-Net paper ("Reverse Engineering of Generative Models: Inferring Model
Hyperparameters from Generated Images", Asnani et al., TPAMI 2023, arXiv:2106.07873). The only
figure found by this project's search is a third-party listing (wizwand.com) of 81.3 loss-function
F1 for it on RE-116 ("RED116"); check it against the paper before relying on it.
"""

from adaparse_jax import models
from adaparse_jax import train as training
from configs import re116


def get_config(arg=None):
    """arg: as configs/re116.py (split number and/or recipe, e.g. '2,improved')."""
    config = re116.get_config(arg)
    config.model = models.model_config("renet")
    return training.apply_recipe(config, config.recipe)  # the recipe's model fields again
