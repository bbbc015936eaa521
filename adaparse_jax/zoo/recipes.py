"""Training recipes of the zoo: which losses train a generator, and so its 10 loss flags.

A `Recipe` is a combination of loss components; its flags follow from the components by one rule
(`Recipe.flags`), the same for every recipe:

  reconstruction "l1"  -> L1    mean absolute error
  reconstruction "l2"  -> L2    Euclidean distance ||G(x) - x||_2 per image (not squared), batch mean
  reconstruction "mse" -> MSE   mean squared error
  MMD on images or on codes (WAE) -> MMD   Gaussian-kernel maximum mean discrepancy
  KL (VAE)             -> KL
  any adversarial term -> Adversarial, plus the flag of its form:
      "ns" non-saturating (binary cross-entropy) -> CE   (RE-116 labels such GANs, e.g. DCGAN, CE)
      "ls" least squares -> LS,  "wgan" (weight clipping) -> WGAN,  "hinge" -> Hinge

The coarse groups are the OR of their member flags as `targets.GROUPS` defines the membership
(L1, L2, MSE, MMD, LS | WGAN, KL, Adversarial, Hinge | CE).

Every recipe trains both kinds of generator:

- latent input (z ~ N(0, I) at sampling time): GANs and MMD map noise to images; reconstruction
  recipes train the generator as the decoder of an auxiliary encoder (`AuxEncoder`, training only,
  not part of the labelled network): a plain autoencoder projects its code onto the sphere of
  radius sqrt(Z), where N(0, I) samples lie; a VAE samples a Gaussian posterior; a WAE matches its
  codes to N(0, I) with MMD.
- encoder (a conditioning crop at sampling time): the crop is degraded (`schema.DEGRADATIONS`) and
  the generator is trained to produce the clean crop (reconstruction, VAE with a variational
  bottleneck inside the generator, WAE on its bottleneck) or realistic images (GAN, MMD).

The discriminator (`Discriminator`) is small and unconditional; it sees generated and real crops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaparse_jax import targets
from adaparse_jax.zoo import generators
from adaparse_jax.zoo.schema import IMAGE_SIZE, Architecture

RECONSTRUCTION_FLAGS = {"l1": "l1", "l2": "l2", "mse": "mse"}
ADVERSARIAL_FLAGS = {"ns": "ce", "ls": "ls", "wgan": "wgan", "hinge": "hinge"}
PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
WGAN_CLIP = 0.05  # critic weight clipping (the original WGAN's 0.01 is for RMSProp at lr 5e-5)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Loss components of one training recipe, with their weights in the generator loss.

    The generator loss is `reconstruction_weight * rec + kl_weight * KL + mmd_weight * MMD +
    adversarial`. Adam with (lr 2e-4, b1 0.5) when there is an adversarial term, else (lr 1e-3,
    b1 0.9), as the usual GAN and autoencoder settings; a generator's lr_scale multiplies the lr.
    """

    name: str
    description: str
    reconstruction: str | None = None
    adversarial: str | None = None
    image_mmd: bool = False
    kl: bool = False
    code_mmd: bool = False
    reconstruction_weight: float = 1.0
    kl_weight: float = 1.0 / PIXELS  # per-pixel ELBO: mean reconstruction + KL / pixels
    mmd_weight: float = 1.0

    def __post_init__(self):
        if self.reconstruction not in (None, *RECONSTRUCTION_FLAGS):
            raise ValueError(f"recipe {self.name!r}: unknown reconstruction {self.reconstruction!r}")
        if self.adversarial not in (None, *ADVERSARIAL_FLAGS):
            raise ValueError(f"recipe {self.name!r}: unknown adversarial form {self.adversarial!r}")
        if (self.kl or self.code_mmd) and self.reconstruction is None:
            raise ValueError(f"recipe {self.name!r}: a VAE/WAE needs a reconstruction term")

    @property
    def flags(self) -> tuple[str, ...]:
        """Names of the loss flags this recipe sets, in `targets.FLAG_TARGETS` order."""
        on = set()
        if self.reconstruction:
            on.add(RECONSTRUCTION_FLAGS[self.reconstruction])
        if self.image_mmd or self.code_mmd:
            on.add("mmd")
        if self.kl:
            on.add("kl")
        if self.adversarial:
            on |= {"adversarial", ADVERSARIAL_FLAGS[self.adversarial]}
        return tuple(t.name for t in targets.FLAG_TARGETS if t.name in on)

    def flag_vector(self) -> np.ndarray:
        """[10] 0/1 row of the loss10 table."""
        return np.array([float(t.name in self.flags) for t in targets.FLAG_TARGETS])

    @property
    def needs_codes(self) -> bool:
        """Reconstruction-trained: a latent-input generator then needs the auxiliary encoder."""
        return self.reconstruction is not None

    @property
    def learning_rate(self) -> float:
        return 2e-4 if self.adversarial else 1e-3

    @property
    def beta1(self) -> float:
        return 0.5 if self.adversarial else 0.9


RECIPES: Mapping[str, Recipe] = {r.name: r for r in (
    Recipe("gan_ns", "GAN, non-saturating (binary cross-entropy) loss", adversarial="ns"),
    Recipe("gan_ls", "least-squares GAN", adversarial="ls"),
    Recipe("gan_wgan", "Wasserstein GAN with weight clipping", adversarial="wgan"),
    Recipe("gan_hinge", "GAN with hinge loss", adversarial="hinge"),
    Recipe("mmd", "moment matching: Gaussian-kernel MMD to real crops", image_mmd=True),
    Recipe("ae_l1", "autoencoder / restoration, L1 reconstruction", reconstruction="l1"),
    Recipe("ae_l2", "autoencoder / restoration, L2 (Euclidean) reconstruction", reconstruction="l2"),
    Recipe("ae_mse", "autoencoder / restoration, MSE reconstruction", reconstruction="mse"),
    Recipe("vae", "VAE: MSE reconstruction + KL", reconstruction="mse", kl=True),
    Recipe("wae_mmd", "Wasserstein autoencoder: L2 reconstruction + MMD of codes to N(0, I)",
           reconstruction="l2", code_mmd=True, mmd_weight=10.0),
    Recipe("pix2pix", "L1 reconstruction + non-saturating adversarial term", reconstruction="l1",
           adversarial="ns", reconstruction_weight=10.0),
    Recipe("vae_gan", "VAE (MSE + KL) + hinge adversarial term", reconstruction="mse", kl=True,
           adversarial="hinge", reconstruction_weight=10.0, kl_weight=10.0 / PIXELS),
)}


def _check_flag_coverage() -> None:
    covered = {f for r in RECIPES.values() for f in r.flags}
    missing = [t.name for t in targets.FLAG_TARGETS if t.name not in covered]
    if missing:
        raise AssertionError(f"no zoo recipe sets the loss flags {missing}")


_check_flag_coverage()


def group_vector(flags: np.ndarray) -> np.ndarray:
    """[..., 10] flags -> [..., 3] coarse groups: the OR of each `targets.GROUPS` member set."""
    flags = np.asarray(flags)
    cols = [[t.column for t in targets.FLAG_TARGETS if t.name in g.members] for g in targets.GROUPS]
    return np.stack([flags[..., c].max(axis=-1) for c in cols], axis=-1)


# ----------------------------------------------------------------------------- auxiliary networks
class Discriminator(nn.Module):
    """Small unconditional critic: [B, 32, 32, 3] -> [B] scores (logits)."""

    @nn.compact
    def __call__(self, x):
        for i, ch in enumerate((16, 32, 64)):
            x = nn.leaky_relu(nn.Conv(ch, (4, 4), strides=(2, 2), name=f"conv{i}")(x), 0.2)
        return nn.Dense(1, name="score")(x.reshape(x.shape[0], -1))[:, 0]


class AuxEncoder(nn.Module):
    """Training-only encoder of latent-input generators: [B, 32, 32, 3] -> (mean, logvar) [B, Z]."""

    latent_dim: int

    @nn.compact
    def __call__(self, x):
        for i, ch in enumerate((16, 32, 64)):
            x = nn.leaky_relu(nn.Conv(ch, (4, 4), strides=(2, 2), name=f"conv{i}")(x), 0.2)
        stats = nn.Dense(2 * self.latent_dim, name="stats")(x.reshape(x.shape[0], -1))
        mean, logvar = jnp.split(stats, 2, axis=-1)
        return mean, jnp.clip(logvar, -8.0, 8.0)


# ----------------------------------------------------------------------------- losses
def reconstruction_loss(kind: str, fake, real):
    """[B, H, W, C] pairs -> scalar (see the module docstring for the three kinds)."""
    err = (fake - real).reshape(fake.shape[0], -1)
    if kind == "l1":
        return jnp.mean(jnp.abs(err))
    if kind == "mse":
        return jnp.mean(err**2)
    if kind == "l2":
        # sqrt of eps-padded sum: finite gradient when an image is reproduced exactly.
        return jnp.mean(jnp.sqrt(jnp.sum(err**2, axis=1) + 1e-8))
    raise ValueError(f"unknown reconstruction loss {kind!r}")


def mmd(a, b, bandwidths=(0.05, 0.2, 1.0, 4.0)):
    """Squared MMD between sample sets a [N, ...] and b [M, ...], Gaussian kernels.

    Bandwidths are relative to the feature dimension D (kernel exp(-||x - y||^2 / (s * D))), so the
    same setting serves 3072-pixel images and 32-dimensional codes.
    """
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)

    def sqdist(x, y):
        return (jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2.0 * x @ y.T)

    daa, dbb, dab = sqdist(a, a), sqdist(b, b), sqdist(a, b)
    d = a.shape[1]
    total = 0.0
    for s in bandwidths:
        k = lambda dist: jnp.mean(jnp.exp(-jnp.maximum(dist, 0.0) / (s * d)))  # noqa: E731
        total = total + k(daa) + k(dbb) - 2.0 * k(dab)
    return total


def discriminator_loss(kind: str, real_scores, fake_scores):
    if kind == "ns":
        return jnp.mean(nn.softplus(-real_scores) + nn.softplus(fake_scores))
    if kind == "ls":
        return 0.5 * jnp.mean((real_scores - 1.0) ** 2 + fake_scores**2)
    if kind == "wgan":
        return jnp.mean(fake_scores) - jnp.mean(real_scores)
    if kind == "hinge":
        return jnp.mean(nn.relu(1.0 - real_scores) + nn.relu(1.0 + fake_scores))
    raise ValueError(f"unknown adversarial form {kind!r}")


def generator_adversarial_loss(kind: str, fake_scores):
    if kind == "ns":
        return jnp.mean(nn.softplus(-fake_scores))
    if kind == "ls":
        return 0.5 * jnp.mean((fake_scores - 1.0) ** 2)
    if kind in ("wgan", "hinge"):
        return -jnp.mean(fake_scores)
    raise ValueError(f"unknown adversarial form {kind!r}")


# ----------------------------------------------------------------------------- training
# Compile time dominates a zoo build on a CPU (XLA:CPU takes about 0.2 s for even an elementwise
# executable, seconds for a network's gradient), so a training step is split into executables of
# which only one is compiled per architecture:
#   generator_step  per (architecture, recipe): generator (+ auxiliary encoder) loss, and the
#                   gradient as one flat vector padded to a power of two
#   adam_flat       Adam on such a vector: one executable per padded size, shared by generators
#   critic_step     the discriminator's loss, gradient and Adam update, all four adversarial forms
#                   in one executable (`lax.switch`), shared by every adversarial generator
# The generator's parameters go back from the flat vector to a tree on the host (NumPy views): a
# tree rebuilt by slicing inside generator_step costs seconds more compile per architecture.
LOSS_TERMS = ("total", "reconstruction", "kl", "mmd", "adversarial", "discriminator")
GENERATOR_TERMS = LOSS_TERMS[:-1]
ADVERSARIAL_FORMS = tuple(ADVERSARIAL_FLAGS)  # ids of the critic's lax.switch


def _optimizer(lr: float, b1: float):
    # lr and b1 live in the optimizer state, so generators differing in them share executables.
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1, b2=0.999)


@jax.jit
def adam_flat(params, opt_state, grads):
    """Adam on flat float32 vectors [N] (lr and b1 read from `opt_state`)."""
    updates, opt_state = _optimizer(0.0, 0.0).update(grads, opt_state, params)
    return params + updates, opt_state


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of a parameter tree sits in a flat vector padded to a power of two."""

    treedef: object
    shapes: tuple
    offsets: tuple
    size: int

    @classmethod
    def of(cls, tree) -> FlatLayout:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        sizes = [int(np.prod(shape)) for shape in shapes]
        return cls(treedef, shapes, tuple(int(o) for o in np.cumsum([0] + sizes[:-1])), sum(sizes))

    @property
    def padded(self) -> int:
        return 1 << max(self.size - 1, 1).bit_length()

    def flatten(self, tree) -> np.ndarray:
        flat = np.zeros(self.padded, np.float32)
        for leaf, offset in zip(jax.tree_util.tree_leaves(tree), self.offsets):
            flat[offset: offset + np.size(leaf)] = np.ravel(leaf)
        return flat

    def flatten_traced(self, tree):
        """`flatten` inside a jitted function."""
        parts = [jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
        return jnp.concatenate(parts + [jnp.zeros(self.padded - self.size, jnp.float32)])

    def unflatten(self, flat: np.ndarray):
        leaves = [flat[o: o + int(np.prod(s))].reshape(s) for s, o in zip(self.shapes, self.offsets)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _image_batch(batch: int = 2):
    return np.zeros((batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def critic_step(params, opt_state, real, fake, form):
    """One discriminator update: (params, opt_state, real, fake, form id) -> (params, opt, loss).

    `form` indexes ADVERSARIAL_FORMS; WGAN's weight clipping applies only to its form.
    """
    disc = Discriminator()
    losses = [functools.partial(discriminator_loss, kind) for kind in ADVERSARIAL_FORMS]

    def loss_fn(p):
        return jax.lax.switch(form, losses, disc.apply({"params": p}, real),
                              disc.apply({"params": p}, fake))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(0.0, 0.0).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    is_wgan = form == ADVERSARIAL_FORMS.index("wgan")
    params = jax.tree_util.tree_map(
        lambda w: jnp.where(is_wgan, jnp.clip(w, -WGAN_CLIP, WGAN_CLIP), w), params)
    return params, opt_state, loss


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The networks and jitted steps of one (architecture, recipe).

    `generator_step(trainable, batch_stats, d_params, real, inputs, key)` -> (flat gradient
    [layout.padded], batch_stats, fake [B, 32, 32, 3], terms [len(GENERATOR_TERMS)]): real
    [B, 32, 32, 3] crops in the data range, inputs [B, ...] the generator inputs (z, or the degraded
    crops of an encoder), d_params the discriminator's parameters (unused without an adversarial
    term).

    `sample(variables, inputs [N, ...], key)` -> images [N, 32, 32, 3] in the data range, BatchNorm
    on its running averages; `sample_batch_statistics` the same with the statistics of the sampled
    batch (used for untrained generators, whose running statistics are the initial 0 / 1).

    Steps run in a Python loop (`train`), not `lax.scan`: XLA:CPU runs convolutions inside a while
    loop tens of times slower than the same convolutions at the top level of a jitted function
    (measured here: 150 ms vs 3.6 ms for one 3x3 conv step).
    """

    arch: Architecture
    recipe: Recipe
    generator: generators.Generator
    encoder: AuxEncoder | None
    layout: FlatLayout  # of {"generator": params[, "encoder": params]}
    generator_step: object
    sample: object
    sample_batch_statistics: object

    def init_state(self, rng: np.random.Generator, lr_scale: float) -> dict:
        """Initial training state from NumPy draws (see `generators.init_variables`)."""
        gen_vars = generators.init_variables(
            self.generator, (np.zeros(generators.input_shape(self.arch, 2), np.float32),), rng,
            train=False)
        trainable = {"generator": gen_vars["params"]}
        if self.encoder is not None:
            trainable["encoder"] = generators.init_variables(
                self.encoder, (_image_batch(),), rng)["params"]
        opt = _optimizer(self.recipe.learning_rate * lr_scale, self.recipe.beta1)
        flat = jnp.asarray(self.layout.flatten(trainable))
        state = {"flat": flat, "opt": opt.init(flat), "batch_stats": gen_vars.get("batch_stats", {})}
        if self.recipe.adversarial:
            disc = generators.init_variables(Discriminator(), (_image_batch(),), rng)["params"]
            state.update(disc=disc, disc_opt=opt.init(disc))
        return state

    def trainable(self, state: dict) -> dict:
        """{"generator": params[, "encoder": params]} as NumPy arrays (copies)."""
        return self.layout.unflatten(np.array(state["flat"]))

    def generator_variables(self, state: dict) -> dict:
        """The generator's flax variables (params [, batch_stats]) in a training state."""
        variables = {"params": self.trainable(state)["generator"]}
        if state["batch_stats"]:
            variables["batch_stats"] = state["batch_stats"]
        return variables

    def train(self, state: dict, real: np.ndarray, inputs: np.ndarray, key) -> tuple[dict, np.ndarray]:
        """Run S steps: real [S, B, 32, 32, 3], inputs [S, B, ...] -> (state, losses [S, T])."""
        adversarial = self.recipe.adversarial
        form = ADVERSARIAL_FORMS.index(adversarial) if adversarial else -1
        flat, opt_state, stats = state["flat"], state["opt"], state["batch_stats"]
        disc, disc_opt = state.get("disc", {}), state.get("disc_opt")
        losses = []
        for i, k in enumerate(jax.random.split(key, len(real))):
            trainable = self.layout.unflatten(np.array(flat))
            grads, stats, fake, terms = self.generator_step(trainable, stats, disc, real[i],
                                                            inputs[i], k)
            flat, opt_state = adam_flat(flat, opt_state, grads)
            d_loss = np.float32(0.0)
            if adversarial:
                disc, disc_opt, d_loss = critic_step(disc, disc_opt, real[i], fake, form)
            losses.append((terms, d_loss))
        state = dict(state, flat=flat, opt=opt_state, batch_stats=stats)
        if adversarial:
            state.update(disc=disc, disc_opt=disc_opt)
        table = np.array([np.append(np.asarray(t), np.asarray(d)) for t, d in losses], np.float32)
        return state, table.reshape(len(real), len(LOSS_TERMS))


@functools.lru_cache(maxsize=64)
def make_trainer(arch: Architecture, recipe_name: str) -> Trainer:
    """Build (once per process and key) the networks and the jitted generator steps."""
    recipe = RECIPES[recipe_name]
    gen = generators.Generator(arch, variational=recipe.kl and arch.encoder)
    enc = AuxEncoder(arch.latent_dim) if (recipe.needs_codes and not arch.encoder) else None
    disc = Discriminator()
    shapes = {"generator": generators.variable_shapes(
        gen, (np.zeros(generators.input_shape(arch, 2), np.float32),), train=False)["params"]}
    if enc is not None:
        shapes["encoder"] = generators.variable_shapes(enc, (_image_batch(),))["params"]
    layout = FlatLayout.of(shapes)

    def forward(trainable, batch_stats, real, inputs, key):
        k_latent, k_prior = jax.random.split(key)
        variables = {"params": trainable["generator"], "batch_stats": batch_stats}
        terms = {}
        if enc is not None:
            mean, logvar = enc.apply({"params": trainable["encoder"]}, real)
            if recipe.kl:
                z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)
                terms["kl"] = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, 1))
            elif recipe.code_mmd:
                z = mean
            else:
                # A plain autoencoder's codes on the sphere where N(0, I) samples concentrate.
                z = math.sqrt(arch.latent_dim) * mean / (
                    jnp.linalg.norm(mean, axis=1, keepdims=True) + 1e-6)
            inputs = z
        (fake, aux), updates = gen.apply(variables, inputs, train=True, rngs={"latent": k_latent},
                                         mutable=["batch_stats"])
        if arch.encoder and recipe.kl:
            terms["kl"] = aux["kl"]
        if recipe.reconstruction:
            terms["reconstruction"] = reconstruction_loss(recipe.reconstruction, fake, real)
        if recipe.image_mmd:
            terms["mmd"] = mmd(fake, real)
        if recipe.code_mmd:
            terms["mmd"] = mmd(aux["code"], jax.random.normal(k_prior, aux["code"].shape))
        return fake, terms, updates.get("batch_stats", {})

    def loss_fn(trainable, batch_stats, d_params, real, inputs, key):
        fake, terms, new_stats = forward(trainable, batch_stats, real, inputs, key)
        if recipe.adversarial:
            scores = disc.apply({"params": d_params}, fake)
            terms["adversarial"] = generator_adversarial_loss(recipe.adversarial, scores)
        total = (recipe.reconstruction_weight * terms.get("reconstruction", 0.0)
                 + recipe.kl_weight * terms.get("kl", 0.0)
                 + recipe.mmd_weight * terms.get("mmd", 0.0)
                 + terms.get("adversarial", 0.0))
        terms["total"] = total
        return total, (terms, fake, new_stats)

    @jax.jit
    def generator_step(trainable, batch_stats, d_params, real, inputs, key):
        (_, (terms, fake, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, batch_stats, d_params, real, inputs, key)
        values = jnp.stack([jnp.asarray(terms.get(k, 0.0), jnp.float32) for k in GENERATOR_TERMS])
        return layout.flatten_traced(grads), new_stats, jax.lax.stop_gradient(fake), values

    @jax.jit
    def sample(variables, inputs, key):
        return gen.apply(variables, inputs, train=False, rngs={"latent": key})[0]

    @jax.jit
    def sample_batch_statistics(variables, inputs, key):
        (images, _), _ = gen.apply(variables, inputs, train=True, rngs={"latent": key},
                                   mutable=["batch_stats"])
        return images

    return Trainer(arch, recipe, gen, enc, layout, generator_step, sample, sample_batch_statistics)
