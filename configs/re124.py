"""AdaParse on RE-116 plus the diffusion models (the official `adaparse_diff*.py` experiment).

  python -m adaparse_jax.prepare --images data/RE123 --labels data/labels --variant re123 \
      --out cache/re123
  python train.py --config configs/re124.py --workdir runs/re124_s1 --config.split=1
  ... --config.split=2 / 3 / 4
  python eval.py --workdir 'runs/re124_s*' --out results/re124

Data: the official diffusion label files (DM_net_arch.npy, DM_loss.npy, DM_loss_3dim.npy) hold 123
rows, the 116 RE-116 generators then 7 diffusion models (ADM, ADM-G, DDPM, DDIM, LDM, Stable
Diffusion, GLIDE; folders may be named Z_1..Z_7); `adaparse_jax.data.re116` calls this set RE-123.
Each split tests 3 diffusion models (as the official scripts do) and trains on the other 120
generators. The file is named re124 after the project's issue; it trains on what the label files
hold.

Training settings: as configs/re116.py (Adam 1e-4, weight decay 1e-4, batch 16, 20 epochs).
Expected runtime: not measured on a GPU here; about 1.15x an RE-116 split (120 vs 104 training
generators, if each holds ~1,000 images).

Paper numbers: see the AdaParse paper (its diffusion-model experiment); no number is quoted here.
"""

from configs import re116


def get_config(arg=None):
    """arg: optional split number."""
    config = re116.get_config(arg)
    config.data.images = "data/RE123"
    config.data.variant = "re123"
    config.data.cache = "cache/re123"
    return config
