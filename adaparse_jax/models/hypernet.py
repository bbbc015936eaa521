"""AdaParse's hypernetwork: the DualEncoder and its Broadcasted Fusion.

The DualEncoder turns the shared DnCNN features `F_latent` [B, H, W, C] into one C x C channel
mixing matrix per image and per target, W [B, T, C, C]:

- the Instance-Aware encoder: conv-BN-ReLU-maxpool stages (64 -> 128 -> 256 -> 512 at full size),
  flatten, then FC + BatchNorm1d + ReLU layers (32768 -> 4096 -> 1024) and a last FC to the
  instance code `z_it` [B, D];
- the Model-Agnostic encoder: learned codes `z_b` [1, D] (shared by all targets) and `z_hp` [T, D]
  (one per target), Xavier-uniform initialised;
- Broadcasted Fusion: the codes broadcast to [B, T, ...], fused (official: concatenation
  [z_b, z_hp^i, z_it] -> 3D), then ONE weight-generation MLP (3D -> hidden, BatchNorm, ReLU,
  hidden -> C * C, sigmoid) applied to all B * T rows at once.

Flatten order: the official code flattens NCHW maps (channel-major) before `fc1`; here the NHWC
map is flattened as it lies (H, W, C) and `convert.py` permutes the rows of the converted `fc1`
kernel instead, so the forward pass has no transpose and converted weights give the same result.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaparse_jax.models.dncnn import BatchNorm, conv3x3, dense

Dtype = Any

FUSIONS = ("concat", "add", "attention")


class InstanceAwareEncoder(nn.Module):
    """F_latent [B, H, W, C] -> instance code z_it [B, code_dim].

    Attributes:
      stage_features: output channels of the conv-BN-ReLU-maxpool stages (`stage{i}_conv`,
        `stage{i}_bn`).
      fc_features: widths of the FC + BatchNorm1d + ReLU layers (`fc1`/`bn1`, ...) before the last
        FC (`fc{n+1}`) to `code_dim`.
    """

    stage_features: tuple[int, ...] = (128, 256, 512)
    fc_features: tuple[int, ...] = (4096, 1024)
    code_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, f in enumerate(self.stage_features, start=1):
            x = conv3x3(f, x.shape[-1], kaiming=True, name=f"stage{i}_conv", **kw)(x)
            x = nn.relu(BatchNorm(name=f"stage{i}_bn", **kw)(x, train))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # (H, W, C) order; see the module docstring
        for i, f in enumerate(self.fc_features, start=1):
            x = dense(f, x.shape[-1], name=f"fc{i}", **kw)(x)
            x = nn.relu(BatchNorm(name=f"bn{i}", **kw)(x, train))
        return dense(self.code_dim, x.shape[-1], name=f"fc{len(self.fc_features) + 1}", **kw)(x)


class BroadcastedFusion(nn.Module):
    """Codes -> per-image, per-target mixing matrices W [B, T, width, width].

    The weight-generation MLP is written once and runs on all B * T fused codes as one batch;
    its BatchNorm sees all B * T rows together, as the official code's does.

    Fusions (`fusion`):
      concat: [z_b, z_hp^i, z_it] concatenated (official), MLP input = (#codes) * D.
      add: the codes summed, MLP input = D. (Projecting each code and then summing would equal
        `concat` followed by the first linear layer, so `add` sums the raw codes.)
      attention: one query per (image, target) attends over the codes as tokens: the query is a
        projection of z_hp^i (of the mean code when z_hp is off), keys and values are projections
        of every code; scaled dot-product softmax over the codes; the attended value (D) feeds the
        MLP. A disabled code is left out of the tokens.

    Row (o, i) of W[b, t] maps input channel i to output channel o: the MLP output is reshaped
    row-major to [width, width], exactly as the official `reshape(bs, T * 64, 64)` followed by
    `F.linear` uses it.
    """

    width: int = 64
    hidden_dim: int = 2048
    fusion: str = "concat"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_b: jax.Array | None, z_hp: jax.Array | None, z_it: jax.Array | None, *,
                 batch_size: int, num_targets: int, train: bool) -> jax.Array:
        """z_b [1, D], z_hp [T, D], z_it [B, D] (None where a code is off) -> W [B, T, width, width]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (batch_size, num_targets)
        # Official concatenation order: base, per-target, instance.
        given = {"z_b": (z_b, lambda z: z[None]), "z_hp": (z_hp, lambda z: z[None]),
                 "z_it": (z_it, lambda z: z[:, None])}
        codes = {name: jnp.broadcast_to(expand(z), (*shape, z.shape[-1])).astype(self.dtype)
                 for name, (z, expand) in given.items() if z is not None}
        if not codes:
            raise ValueError("BroadcastedFusion needs at least one code (config fields "
                             "use_base_code, use_hp_code and use_instance_code are all False)")
        if self.fusion == "concat":
            fused = jnp.concatenate(list(codes.values()), axis=-1)
        elif self.fusion == "add":
            fused = sum(codes.values())
        elif self.fusion == "attention":
            tokens = jnp.stack(list(codes.values()), axis=-2)  # [B, T, n, D]
            d = tokens.shape[-1]
            q_src = codes["z_hp"] if "z_hp" in codes else jnp.mean(tokens, axis=-2)
            q = dense(d, d, name="query", **kw)(q_src)
            k = dense(d, d, name="key", **kw)(tokens)
            v = dense(d, d, name="value", **kw)(tokens)
            attn = jax.nn.softmax(jnp.einsum("btd,btnd->btn", q, k) * d**-0.5)
            fused = jnp.einsum("btn,btnd->btd", attn, v)
        else:
            raise ValueError(f"config field fusion={self.fusion!r}; expected one of {FUSIONS}")
        y = dense(self.hidden_dim, fused.shape[-1], name="fc1", **kw)(fused)
        y = nn.relu(BatchNorm(name="bn", **kw)(y, train))
        y = nn.sigmoid(dense(self.width * self.width, y.shape[-1], name="fc2", **kw)(y))
        return y.reshape(*shape, self.width, self.width)


class DualEncoder(nn.Module):
    """F_latent [B, H, W, C] -> mixing matrices W [B, T, C, C] (T = num_targets).

    Attributes:
      use_instance_code / use_base_code / use_hp_code: which of z_it, z_b, z_hp take part; a code
        that is off has no parameters.
    """

    num_targets: int = 25
    width: int = 64
    stage_features: tuple[int, ...] = (128, 256, 512)
    fc_features: tuple[int, ...] = (4096, 1024)
    code_dim: int = 256
    hidden_dim: int = 2048
    use_instance_code: bool = True
    use_base_code: bool = True
    use_hp_code: bool = True
    fusion: str = "concat"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f_latent: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xavier = nn.initializers.xavier_uniform()
        z_b = (self.param("z_b", xavier, (1, self.code_dim), self.param_dtype)
               if self.use_base_code else None)
        z_hp = (self.param("z_hp", xavier, (self.num_targets, self.code_dim), self.param_dtype)
                if self.use_hp_code else None)
        z_it = (InstanceAwareEncoder(self.stage_features, self.fc_features, self.code_dim,
                                     name="instance_encoder", **kw)(f_latent, train)
                if self.use_instance_code else None)
        return BroadcastedFusion(self.width, self.hidden_dim, self.fusion, name="fusion", **kw)(
            z_b, z_hp, z_it, batch_size=f_latent.shape[0], num_targets=self.num_targets,
            train=train)
