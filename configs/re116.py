"""AdaParse on RE-116 with the paper's settings, one of the 4 official test splits.

  python -m adaparse_jax.prepare --images data/RE116 --labels data/labels --out cache/re116
  python train.py --config configs/re116.py --workdir runs/re116_s1 --config.split=1
  ... --config.split=2 / 3 / 4 (workdirs runs/re116_s2 ... s4)
  python eval.py --workdir 'runs/re116_s*' --out results/re116

Settings (the official training script's): Adam, learning rate 1e-4, weight decay 1e-4 added to the
gradient, batch 16, 20 epochs, lambda = 10, code dimension 256, weight-generation hidden width 2048,
personalisation of DnCNN blocks 6-10 (hypernetwork fed by block 5), 64x64 inputs normalised with
mean 0.6490 / std 0.1269, class weights counted over all 116 generators (the official literals;
`--config.class_weights=train` counts the training generators only). The last checkpoint is
evaluated; `--config.data.num_val=8` holds 8 training generators out for model selection instead.
Ablations are overrides, e.g. `--config.model.fusion=add`, `--config.model.use_instance_code=False`.

Expected runtime: not measured on a GPU in this project yet (see BENCHMARKS.md for measured
throughput). Arithmetic: a split trains on 104 generators (~104,000 images; 6,500 steps per epoch),
20 epochs = ~2.1 M images at ~156 GFLOP per training image (docs: DESIGN, "Cost") = ~3.2e17 FLOP,
about 7 minutes at the 5,100 img/s H100 ceiling, 14 at half of it. On a CPU this is not practical.

Paper numbers: see the AdaParse paper ("AdaParse: Personalized Fingerprinting for Visual
Generative Model Reverse Engineering"), Tables II-IV; this project could not retrieve the tables'
text, so no number is quoted here.
"""

from adaparse_jax import train as training


def get_config(arg=None):
    """arg: optional split number ('configs/re116.py:2' equals --config.split=2)."""
    config = training.default_config()
    config.data.images = "data/RE116"
    config.data.labels = "data/labels"
    config.data.variant = "re116"
    config.data.cache = "cache/re116"
    config.split = int(arg) if arg else 1
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
