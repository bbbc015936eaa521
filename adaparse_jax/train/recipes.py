"""Training recipes: named sets of config overrides on top of a training config.

- 'official' (the default of every config): the papers' code, quirks included.
- 'improved': the learning options that make the parsing networks read the architecture in short
  CPU runs (docs/EXPERIMENTS.md, "Parsing networks that learn", with the measurement behind each
  choice). They act on what the diagnosis found (`python -m adaparse_jax.diagnose`): the FEN reads
  the image's fixed high-pass residual and each fingerprint is that residual plus the FEN's
  output (the trace the image carries survives the constraints), the parser reads the log
  amplitude spectrum of each fingerprint channel's high-pass residual (its spectral branch, beside
  the conv stages: the features the spectral probe reads, per colour channel, where the loss
  groups leave traces the channel mean cancels; the heads also read them directly) through
  He-initialised layers, at the fingerprint's own scale (no RMS normalisation: its level is what
  reads the loss groups), the cross-entropy reads logits, the low-frequency window
  keeps the official 25/64 ratio at any size, and the constraints weigh 1/100 of the official
  weights so they no longer swamp the parsing losses' gradient on the FEN; the learning rate
  decays to 0 over the run (cosine).

  python train.py --config configs/re116.py:improved --workdir runs/improved_split1
  python -m adaparse_jax.demo                       # both recipes side by side on the zoo

A recipe is applied once, when a config is made (`apply_recipe`); `config.recipe` records it and
names the run in the tables ("AdaParse (improved)"). Single fields can still be overridden after.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

RECIPES: Mapping[str, Mapping[str, object]] = {
    "official": {},
    "improved": {
        "model.fen_input": "highpass",
        "model.fingerprint_skip": "highpass",
        "model.parser_spectrum": "concat",
        "model.parser_spectrum_heads": True,
        "model.parser_spectrum_channels": "rgb",
        "model.parser_pool": "global",
        "model.parser_init": "he",
        "loss.ce_input": "logits",
        "loss.lowfreq_window": "scaled",
        "loss.constraint_scale": 0.01,
        "optimizer.schedule": "cosine",
    },
}


def apply_recipe(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set `config`'s fields to the recipe `name` (in place; returned for chaining)."""
    if name not in RECIPES:
        raise ValueError(f"config field recipe={name!r}; expected one of {tuple(RECIPES)}")
    for path, value in RECIPES[name].items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.recipe = name
    return config
