"""What a zoo generator is: the RE-116 schema of discrete choices plus nuisance factors, and a
balanced sampler of them.

Class ids of the 6 discrete targets (`CLASS_NAMES[target][id]`) are this project's definition: RE-116
does not publish its class names. They agree with its label rows where its convention is evident
(DCGAN: batch norm, ReLU, tanh, transposed conv, latent input; StyleGAN: an instance-type norm,
leaky ReLU, a linear last layer, resize up-sampling). RE-116's skip column is not consistent with the
papers' models, so here 1 simply means "residual connections in every block".

Sampling is balanced and independent: for each attribute (discrete target, nuisance factor, training
recipe) the zoo cycles through its classes and shuffles that column on its own, so every class
occurs equally often (up to one when the zoo size is not a multiple of the class count) and no
attribute predicts another. The nuisance factors (width, depth, blocks, layers per block, FC
layers, latent size, ...) vary the 9 counts, which are then measured on the built network
(`generators.architecture_counts`), never taken from these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from adaparse_jax import targets

# Class names by id for every discrete target, keyed by the target's name in `targets.HEADS`.
CLASS_NAMES: Mapping[str, tuple[str, ...]] = {
    "normalization": ("batch", "instance", "none", "layer"),
    "nonlin_block": ("tanh", "relu", "leaky_relu", "sigmoid"),
    "nonlin_last": ("sigmoid", "tanh", "identity", "relu"),
    "upsampling": ("transposed_conv", "resize_conv"),
    "skip": ("no", "yes"),
    "downsampling": ("latent_input", "encoder"),
}

# Nuisance factors: unlabelled, balanced like the labelled ones. Factors that depend on the input
# mode are recorded as None where they do not apply (down_kind and degradation for latent-input
# generators; resize_method for transposed convolutions).
MAX_CHANNELS = 64
IMAGE_SIZE = 32
DOWN_KINDS = ("strided_conv", "conv_avgpool")  # encoders only
RESIZE_METHODS = ("nearest", "bilinear")  # resize_conv only
# Encoder generators map a conditioning crop to an image; what the crop went through first:
DEGRADATIONS = ("identity", "blur", "noise", "grayscale")


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Choices of the nuisance factors that vary the 9 counts.

    Attributes:
      widths: channels at 32x32, doubled per resolution level and capped at MAX_CHANNELS.
      stages: up-sampling stages (2: an 8x8 bottleneck, 3: 4x4).
      layers_per_block, mid_blocks: conv layers per block; blocks at the bottleneck resolution.
      fc_latent: dense layers of latent-input generators (the last one projects to the bottleneck).
      fc_encoder: dense layers of an encoder's FC bottleneck (0: none).
      latent_dims: size of z. lr_scales: multipliers of the recipe's learning rate.
    """

    widths: tuple[int, ...] = (8, 12, 16)
    stages: tuple[int, ...] = (2, 3)
    layers_per_block: tuple[int, ...] = (1, 2, 3)
    mid_blocks: tuple[int, ...] = (0, 1, 2)
    fc_latent: tuple[int, ...] = (1, 2, 3)
    fc_encoder: tuple[int, ...] = (0, 2, 3)
    latent_dims: tuple[int, ...] = (32, 64)
    lr_scales: tuple[float, ...] = (0.5, 1.0, 2.0)


NUISANCE = {
    "full": Nuisance(),
    # The smallest networks of the schema, for test-sized zoos: compiles take about 2/3 as long.
    "small": Nuisance(widths=(8,), layers_per_block=(1,), mid_blocks=(0,), fc_latent=(1,),
                      fc_encoder=(0,)),
}

# Independent random streams of one zoo seed (numpy SeedSequence entropy [seed, stream, ...]).
SCHEMA_STREAM = 0


def _check_against_targets() -> None:
    discrete = {t.name: t.num_classes for t in targets.DISCRETE_TARGETS}
    got = {k: len(v) for k, v in CLASS_NAMES.items()}
    if got != discrete:
        raise AssertionError(f"zoo CLASS_NAMES {got} disagree with targets.DISCRETE_TARGETS {discrete}")


_check_against_targets()


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One generator architecture. Hashable: equal architectures share compiled steps.

    The six labelled choices are stored by class name (see `CLASS_NAMES`); `class_ids` gives the
    label-table ids.
    """

    normalization: str
    nonlin_block: str
    nonlin_last: str
    upsampling: str
    skip: str
    downsampling: str
    width: int
    stages: int
    layers_per_block: int
    mid_blocks: int
    fc_layers: int
    latent_dim: int | None  # latent-input generators only
    down_kind: str | None  # encoders only
    resize_method: str | None  # resize_conv only

    def __post_init__(self):
        for name, classes in CLASS_NAMES.items():
            if getattr(self, name) not in classes:
                raise ValueError(f"Architecture.{name}={getattr(self, name)!r}; expected one of {classes}")

    @property
    def encoder(self) -> bool:
        return self.downsampling == "encoder"

    def channels(self, level: int) -> int:
        """Channels at resolution level `level` (0: 32x32, `stages`: the bottleneck)."""
        return min(self.width * 2**level, MAX_CHANNELS)

    @property
    def bottleneck_size(self) -> int:
        return IMAGE_SIZE // 2**self.stages

    def class_ids(self) -> dict[str, int]:
        """Label-table class id of each discrete target."""
        return {name: CLASS_NAMES[name].index(getattr(self, name)) for name in CLASS_NAMES}


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """Everything that defines one zoo generator before it is built.

    Attributes:
      name: folder and label-row name.
      index: position in the sampled zoo; with the zoo seed it seeds this generator's randomness.
      arch: the architecture.
      recipe: name of its training recipe (`recipes.RECIPES`), which fixes its loss flags.
      lr_scale: nuisance multiplier of the recipe's learning rate.
      degradation: for encoders, what the conditioning crop went through (`DEGRADATIONS`).
    """

    name: str
    index: int
    arch: Architecture
    recipe: str
    lr_scale: float
    degradation: str | None

    def describe(self) -> dict:
        """Hyperparameters in words (the manifest's per-generator record)."""
        return {"architecture": dataclasses.asdict(self.arch), "recipe": self.recipe,
                "lr_scale": self.lr_scale, "degradation": self.degradation}


def generator_names(num_generators: int) -> list[str]:
    """Zero-padded names: code-point order equals RE-116's row order (`_` read as a space)."""
    width = max(3, len(str(num_generators - 1)))
    return [f"G{i:0{width}d}" for i in range(num_generators)]


def sort_names(names: Sequence[str]) -> list[str]:
    """RE-116's label-row order: names sorted with `_` read as a space."""
    return sorted(names, key=lambda n: n.replace("_", " "))


def balanced_column(rng: np.random.Generator, num_classes: int, n: int) -> np.ndarray:
    """[n] class ids, each class equally often (up to one), in an independently shuffled order."""
    column = np.arange(n) % num_classes
    rng.shuffle(column)
    return column


def sample_specs(num_generators: int, seed: int, recipe_names: Sequence[str],
                 nuisance: Nuisance = NUISANCE["full"]) -> list[GeneratorSpec]:
    """Sample a zoo's generators: every attribute balanced and shuffled independently.

    Deterministic in the arguments.
    """
    if num_generators < 1:
        raise ValueError(f"a zoo needs at least one generator, got num_generators={num_generators}")
    n = num_generators
    rng = np.random.default_rng([seed, SCHEMA_STREAM])

    def draw(choices):
        return [choices[i] for i in balanced_column(rng, len(choices), n)]

    labelled = {name: draw(classes) for name, classes in CLASS_NAMES.items()}
    width, stages = draw(nuisance.widths), draw(nuisance.stages)
    lpb, mid = draw(nuisance.layers_per_block), draw(nuisance.mid_blocks)
    fc_latent, fc_encoder = draw(nuisance.fc_latent), draw(nuisance.fc_encoder)
    latent_dim, down_kind = draw(nuisance.latent_dims), draw(DOWN_KINDS)
    resize, lr_scale = draw(RESIZE_METHODS), draw(nuisance.lr_scales)
    degradation, recipe = draw(DEGRADATIONS), draw(tuple(recipe_names))

    specs = []
    for i, name in enumerate(generator_names(n)):
        encoder = labelled["downsampling"][i] == "encoder"
        arch = Architecture(
            **{k: v[i] for k, v in labelled.items()},
            width=width[i], stages=stages[i], layers_per_block=lpb[i], mid_blocks=mid[i],
            fc_layers=fc_encoder[i] if encoder else fc_latent[i],
            latent_dim=None if encoder else latent_dim[i],
            down_kind=down_kind[i] if encoder else None,
            resize_method=resize[i] if labelled["upsampling"][i] == "resize_conv" else None,
        )
        specs.append(GeneratorSpec(name=name, index=i, arch=arch, recipe=recipe[i],
                                   lr_scale=float(lr_scale[i]),
                                   degradation=degradation[i] if encoder else None))
    return specs
