"""AdaParse: a personalised FEN (one fingerprint per image and target) and the ParsingNetwork.

PersonalizedFEN, at full size (depth 17, source block 5, injection block 10):

  images [B, 64, 64, 3]
    -> stem conv + blocks 1-5 (shared)                        F_latent [B, 64, 64, 64]
    -> DualEncoder(F_latent)                                  W [B, 25, 64, 64]
    -> blocks 6-10 on F_latent, once                          [B, 64, 64, 64]
    -> per-sample, per-target 1x1 channel mixing with W       [B, 25, 64, 64, 64]
    -> blocks 11-15 + final conv on the B * 25 folded streams  fingerprints [B, 25, 64, 64, 3]

The 25 streams are folded into the batch of single convolutions, so their BatchNorms see all
B * 25 samples at once, as the official code's do.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaparse_jax.models.dncnn import DnCNN
from adaparse_jax.models.hypernet import DualEncoder
from adaparse_jax.models.parsing import FENParser

Dtype = Any


class PersonalizedFEN(nn.Module):
    """images [B, H, W, 3] -> fingerprints [B, T, H, W, 3], T = hypernet.num_targets.

    Attributes:
      hypernet: the DualEncoder generating W [B, T, width, width] from the source block's output.
      width, depth: the DnCNN's channels and number of convolutions (stem and final included).
      source_block: the block whose output feeds the hypernetwork (0: the stem's output).
      inject_block: the block after which W mixes the channels; the later blocks and the final
        convolution run on the T folded streams.
      conv_impl: how the DnCNN's convolutions are computed (`conv_ops.CONV_IMPLS`).
      final_init: the final convolution's initialisation (`DnCNN.final_init`).
    """

    hypernet: DualEncoder
    width: int = 64
    depth: int = 17
    source_block: int = 5
    inject_block: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    final_init: str = "kaiming"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(width=self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                  conv_impl=self.conv_impl)
        f_latent = DnCNN(num_blocks=self.source_block, first_block=1, stem=True, name="shared",
                         **kw)(images, train)
        mixing = self.hypernet(f_latent, train)
        x = DnCNN(num_blocks=self.inject_block - self.source_block,
                  first_block=self.source_block + 1, name="middle", **kw)(f_latent, train)
        # W[b, t] is a per-sample 1x1 convolution without bias: out channel o = sum_c W[o, c] x_c.
        x = jnp.einsum("bhwc,btoc->bthwo", x, mixing.astype(self.dtype))
        b, t, h, w, c = x.shape
        x = DnCNN(num_blocks=self.depth - 2 - self.inject_block, first_block=self.inject_block + 1,
                  out_channels=3, final_init=self.final_init, name="adaptive", **kw)(x.reshape(b * t, h, w, c), train)
        return x.reshape(b, t, h, w, 3)


class AdaParse(FENParser):
    """AdaParse: PersonalizedFEN -> 25 fingerprints -> ParsingNetwork (head i reads fingerprint i).

    images [B, S, S, 3] -> {'fingerprints' [B, 25, S, S, 3], 'continuous', 'logits', 'probs'}.
    """
