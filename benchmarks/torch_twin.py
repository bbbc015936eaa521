"""A PyTorch twin of RE-Net and AdaParse and of their training step, for side-by-side timing.

The twin is the same two networks written the way a PyTorch user writes them (NCHW, `nn.Sequential`
runs, `torch.optim.Adam` with `weight_decay`), built from the project's model config and the
parity facts in shared/reference: its `state_dict` names and shapes are the official ones
(`official_state_dicts.json`), so `adaparse_jax.convert` moves one set of weights between the JAX
model and the twin (`load_variables`). `tests/test_torch_twin.py` holds the twin's outputs, loss
terms, gradients and one Adam step to the JAX model's on the same converted weights (tiny size);
`benchmarks.model_bench.twin_rows` times both in one process.

    twin = torch_twin.build(cfg)                       # cfg = models.model_config(arch, size)
    torch_twin.load_variables(twin, cfg, variables)    # the JAX model's {'params', 'batch_stats'}
    step = torch_twin.TrainStep(twin, config.optimizer, config.loss, label_table, class_weights)
    terms = step(torch_twin.to_nchw(images_uint8), generator_ids)

Needs the optional `torch` extra (`pip install -e .[torch]`).

What the twin is:
  RE-Net     DnCNN FEN (`layers.i.0` conv, `layers.i.1` BatchNorm2d) -> one fingerprint per
             image -> the ParsingNetwork (every head reads that fingerprint). The official RE-Net
             parser is an older network; RE-Net here is the project's (the AdaParse parser on one
             fingerprint), so the twin is too.
  AdaParse   DnCNN blocks 1-5 (`layers`), the dual encoder (`hypernet.*`: extractor stages,
             fc1-fc3 with BatchNorm1d to z_it, [z_b, z_hp, z_it] concatenated, fc4-bn3-fc5 and a
             sigmoid to W [B, 25, C, C]), blocks 6-10 (`layers1`), the per-image 1x1 mixing as one
             batched matrix product, blocks 11-15 + final conv (`layers2`) on the B x 25 streams
             -> 25 fingerprints per image -> the ParsingNetwork (head i reads fingerprint i).
  loss       the four fingerprint constraints on the float32 spectrum and lambda x (continuous
             L2 + 19 class-weighted cross-entropies on the sigmoid outputs), the official terms
             (`adaparse_jax.losses` with `ce_input='probs'`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaparse_jax import convert, spectral, targets
from adaparse_jax.data import pipeline


def default_threads() -> int:
    """The cores this process may run on: XLA:CPU's thread pool uses as many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------
# The networks.


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dncnn_run(width: int, blocks: int, *, stem: bool = False, out_channels: int | None = None) -> nn.Sequential:
    """Consecutive DnCNN layers: [stem conv + ReLU], blocks of conv-BN-ReLU, [final conv]."""
    layers = [nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True))] if stem else []
    layers += [conv_bn_relu(width, width) for _ in range(blocks)]
    if out_channels is not None:
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class DnCNNFEN(nn.Module):
    """RE-Net's FEN: images [B, 3, S, S] -> one fingerprint per image [B, 1, 3, S, S]."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__()
        self.layers = dncnn_run(cfg.width, cfg.depth - 2, stem=True, out_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).unsqueeze(1)


class HyperNet(nn.Module):
    """The dual encoder: F_latent [B, C, H, W] -> mixing matrices W [B, T, C, C]."""

    def __init__(self, cfg: ml_collections.ConfigDict, num_targets: int = targets.NUM_HEADS):
        super().__init__()
        self.num_targets, self.width = num_targets, cfg.width
        self.basecode = nn.Parameter(torch.empty(1, cfg.code_dim))
        self.hpcode = nn.Parameter(torch.empty(num_targets, cfg.code_dim))
        stages, cin = [], cfg.width
        for f in cfg.extractor_features:
            stages.append(nn.Sequential(nn.Conv2d(cin, f, 3, padding=1), nn.BatchNorm2d(f),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            cin = f
        self.extractor = nn.Sequential(*stages)
        side = cfg.image_size // 2 ** len(cfg.extractor_features)
        widths = [cin * side * side, *cfg.fc_features]
        n = len(cfg.fc_features)
        for i in range(1, n + 1):  # instance encoder: fc_i + bn_i + ReLU
            setattr(self, f"fc{i}", nn.Linear(widths[i - 1], widths[i]))
            setattr(self, f"bn{i}", nn.BatchNorm1d(widths[i]))
        setattr(self, f"fc{n + 1}", nn.Linear(widths[-1], cfg.code_dim))  # -> z_it
        setattr(self, f"fc{n + 2}", nn.Linear(3 * cfg.code_dim, cfg.hidden_dim))  # fusion MLP
        setattr(self, f"bn{n + 1}", nn.BatchNorm1d(cfg.hidden_dim))
        setattr(self, f"fc{n + 3}", nn.Linear(cfg.hidden_dim, cfg.width * cfg.width))
        self.n = n
        nn.init.xavier_uniform_(self.basecode)
        nn.init.xavier_uniform_(self.hpcode)

    def forward(self, f_latent: torch.Tensor) -> torch.Tensor:
        b, t, n = f_latent.shape[0], self.num_targets, self.n
        z = self.extractor(f_latent).flatten(1)  # (C, H, W) order, as torch flattens
        for i in range(1, n + 1):
            z = F.relu(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(z)))
        z_it = getattr(self, f"fc{n + 1}")(z)
        d = z_it.shape[-1]
        codes = torch.cat([self.basecode.expand(b, t, d), self.hpcode.expand(b, t, d),
                           z_it[:, None].expand(b, t, d)], dim=-1).reshape(b * t, 3 * d)
        y = F.relu(getattr(self, f"bn{n + 1}")(getattr(self, f"fc{n + 2}")(codes)))
        y = torch.sigmoid(getattr(self, f"fc{n + 3}")(y))
        return y.reshape(b, t, self.width, self.width)


class PersonalizedFEN(nn.Module):
    """AdaParse's FEN: images [B, 3, S, S] -> T fingerprints per image [B, T, 3, S, S]."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__()
        self.hypernet = HyperNet(cfg)
        self.layers = dncnn_run(cfg.width, cfg.source_block, stem=True)
        self.layers1 = dncnn_run(cfg.width, cfg.inject_block - cfg.source_block)
        self.layers2 = dncnn_run(cfg.width, cfg.depth - 2 - cfg.inject_block, out_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        w = self.hypernet(y)  # [B, T, O, C]
        y = self.layers1(y)
        b, c, h, wd = y.shape
        t = w.shape[1]
        # Per image, out[t, o] = sum_c W[t, o, c] y[c]: one batched product for all targets.
        mixed = torch.bmm(w.reshape(b, t * c, c), y.reshape(b, c, h * wd)).reshape(b * t, c, h, wd)
        return self.layers2(mixed).reshape(b, t, 3, h, wd)


class ParsingNetwork(nn.Module):
    """Fingerprints [B, T, 3, S, S] -> {'continuous' [B, 9], 'logits', 'probs'} (T = 25 or 1)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__()
        cin, side = 3, cfg.image_size
        for i, f in enumerate(cfg.parser_conv_features, start=1):
            setattr(self, f"layer{i}", nn.Sequential(nn.Conv2d(cin, f, 3, padding=2), nn.ReLU(),
                                                     nn.MaxPool2d(2)))
            cin, side = f, (side + 2) // 2
        self.num_stages = len(cfg.parser_conv_features)
        self.drop_out = nn.Dropout(cfg.dropout)
        widths = [cin * side * side, *cfg.parser_fc_features]
        self.fcs = len(cfg.parser_fc_features)
        for i in range(1, self.fcs + 1):
            setattr(self, f"fc{i}", nn.Linear(widths[i - 1], widths[i]))
        # The official module names of the heads (fc8_k, fc9_k, fc10_k), generated from the spec.
        self.head_modules = {name: module for module, name in convert.official_head_names().items()}
        for module, name in convert.official_head_names().items():
            setattr(self, module, nn.Linear(widths[-1], targets.BY_NAME[name].num_classes))

    def head_input(self, features: torch.Tensor, target: targets.Target) -> torch.Tensor:
        if features.shape[1] == 1:
            return features[:, 0]
        if target.kind == targets.GROUP:
            return features[:, list(targets.group_members_indices(target))].mean(dim=1)
        return features[:, targets.head_index(target.name)]

    def forward(self, fingerprints: torch.Tensor) -> dict:
        b, t = fingerprints.shape[:2]
        x = fingerprints.reshape(b * t, *fingerprints.shape[2:])
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.drop_out(x.flatten(1))
        for i in range(1, self.fcs + 1):
            x = F.relu(getattr(self, f"fc{i}")(x))
        features = x.reshape(b, t, -1)

        def head(target):
            return getattr(self, self.head_modules[target.name])(self.head_input(features, target))

        continuous = torch.cat([head(tg) for tg in targets.CONTINUOUS_TARGETS], dim=-1)
        logits = {tg.name: head(tg) for tg in targets.DISCRETE_TARGETS + targets.GROUPS
                  + targets.FLAG_TARGETS}
        probs = {name: torch.sigmoid(v) for name, v in logits.items()}
        for flag in targets.FLAG_TARGETS:
            probs[flag.name] = probs[flag.name] * probs[flag.group][:, 1:2]
        return {"continuous": torch.sigmoid(continuous), "logits": logits, "probs": probs}


class Twin(nn.Module):
    """FEN + ParsingNetwork: normalised images [B, 3, S, S] -> {'fingerprints' [B, T, 3, S, S], ...}."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__()
        self.fen = PersonalizedFEN(cfg) if cfg.arch == "adaparse" else DnCNNFEN(cfg)
        self.parser = ParsingNetwork(cfg)

    def forward(self, images: torch.Tensor) -> dict:
        fingerprints = self.fen(images)
        return {"fingerprints": fingerprints, **self.parser(fingerprints)}


def _check(cfg: ml_collections.ConfigDict) -> None:
    if cfg.dtype != "float32" or cfg.param_dtype != "float32":
        raise ValueError(f"the twin computes in float32; config fields dtype={cfg.dtype!r}, "
                         f"param_dtype={cfg.param_dtype!r}")
    if cfg.arch == "adaparse" and (cfg.fusion != "concat" or not (
            cfg.use_instance_code and cfg.use_base_code and cfg.use_hp_code)):
        raise ValueError("the twin is the official AdaParse: config fields fusion='concat' and "
                         "use_instance_code = use_base_code = use_hp_code = True")


def build(cfg: ml_collections.ConfigDict) -> Twin:
    """The twin of `models.build_model(cfg)` (official architecture options only), float32."""
    _check(cfg)
    return Twin(cfg)


def plans(cfg: ml_collections.ConfigDict) -> dict[str, list]:
    """`convert` plans of the twin's two state dicts: {'fen': ..., 'parser': ...}."""
    fen = convert.fen_plan(cfg) if cfg.arch == "adaparse" else convert.renet_fen_plan(cfg)
    return {"fen": fen, "parser": convert.parser_plan(cfg)}


def load_variables(twin: Twin, cfg: ml_collections.ConfigDict, variables: Mapping) -> None:
    """Copy the JAX model's variables ({'params', 'batch_stats'}) into the twin (`convert.to_torch`)."""
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    for part, plan in plans(cfg).items():
        state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
                 convert.to_torch(variables, plan).items()}
        missing, unexpected = getattr(twin, part).load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"twin {part}: missing {missing}, unexpected {unexpected}")


def state_dicts(twin: Twin, cfg: ml_collections.ConfigDict, *, grads: bool = False) -> dict[str, np.ndarray]:
    """The twin's parameters and buffers (or the parameters' gradients) by official name, NumPy."""
    out = {}
    for part in plans(cfg):
        module = getattr(twin, part)
        if grads:
            out.update({k: p.grad.numpy().copy() for k, p in module.named_parameters()})
        else:
            out.update({k: v.detach().numpy().copy() for k, v in module.state_dict().items()
                        if not k.endswith("num_batches_tracked")})
    return out


# ------------------------------------------------------------------------------------------------
# Inputs, loss and the training step.


def to_nchw(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised float32 [B, 3, S, S] (the arithmetic of `pipeline.normalize`)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - pipeline.MEAN) / pipeline.STD).contiguous()


def fingerprint_constraints(fingerprints: torch.Tensor, loss_config) -> dict:
    """The four weighted constraint terms on fingerprints [B, T, 3, S, S], in float32."""
    x = fingerprints.reshape(-1, *fingerprints.shape[2:]).float()
    r, g, b = spectral.GRAY_WEIGHTS
    gray = r * x[:, 0] + g * x[:, 1] + b * x[:, 2]
    f = torch.fft.fft2(gray)
    h, w = gray.shape[-2:]
    spectrum = torch.sqrt(torch.clamp(f.real ** 2 + f.imag ** 2, min=spectral.POWER_FLOOR))
    spectrum = torch.roll(spectrum, shifts=(-(h // 2), -(w // 2)), dims=(-2, -1))
    rows, cols = spectral.lowfreq_slices(h, w, spectral.clamped_half_size(
        h, w, loss_config.lowfreq_half_size))
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[rows, cols] = False
    highfreq_max = torch.max(torch.where(outside, spectrum, torch.zeros(())))
    return {
        "magnitude": loss_config.magnitude_weight * torch.mean(gray ** 2),
        "spectrum": loss_config.spectrum_weight * torch.mean(spectrum[:, rows, cols] ** 2),
        "repetitive": -loss_config.repetitive_weight * torch.clamp(
            highfreq_max, max=loss_config.repetitive_threshold),
        "energy": loss_config.energy_weight * torch.mean((spectrum - spectrum.transpose(-1, -2)) ** 2),
    }


def weighted_cross_entropy(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """torch's CrossEntropyLoss(weight) (sum w_y nll / sum w_y), 0 where every weight is 0."""
    num = F.cross_entropy(scores, labels, weight=weights, reduction="sum")
    den = weights[labels].sum()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones(())), torch.zeros(()))


def total_loss(outputs: dict, labels: dict, class_weights: dict, loss_config) -> tuple[torch.Tensor, dict]:
    """(total, terms): the official training loss (`losses.total_loss` with ce_input='probs')."""
    if loss_config.ce_input != "probs":
        raise ValueError(f"the twin has the official loss only: loss_config.ce_input="
                         f"{loss_config.ce_input!r}, expected 'probs'")
    terms = fingerprint_constraints(outputs["fingerprints"], loss_config)
    lam = loss_config.prediction_weight
    terms["continuous"] = lam * F.mse_loss(outputs["continuous"], labels["continuous"])
    for t in targets.CLASSIFICATION_TARGETS:
        terms[t.name] = lam * weighted_cross_entropy(outputs["probs"][t.name], labels[t.name],
                                                     class_weights[t.name])
    total = sum(terms.values())
    terms["total"] = total
    return total, terms


class TrainStep:
    """One optimiser step of the twin: forward (train mode), loss, backward, torch Adam.

    `optimizer` holds learning_rate, weight_decay, b1, b2, eps (the training config's `optimizer`
    group; torch's Adam adds weight_decay * param to the gradient, as the official code's optimiser
    and the project's `make_optimizer` do); `loss_config` is the training config's `loss` group.
    Labels are gathered from `label_table` [G, 28] by generator id.
    """

    def __init__(self, twin: Twin, optimizer: ml_collections.ConfigDict, loss_config,
                 label_table: np.ndarray, class_weights: Mapping[str, np.ndarray]):
        opt = optimizer
        self.twin = twin
        self.optimizer = torch.optim.Adam(twin.parameters(), lr=opt.learning_rate,
                                          betas=(opt.b1, opt.b2), eps=opt.eps,
                                          weight_decay=opt.weight_decay)
        self.label_table = torch.from_numpy(np.asarray(label_table, np.float32))
        self.class_weights = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in class_weights.items()}
        self.loss_config = loss_config

    def labels(self, generator: torch.Tensor) -> dict:
        rows = self.label_table[generator]
        out = {"continuous": rows[:, list(targets.CONTINUOUS_COLUMNS)]}
        out.update({t.name: rows[:, targets.column_index(t.name)].long()
                    for t in targets.CLASSIFICATION_TARGETS})
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Tensor) -> dict:
        self.twin.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = total_loss(self.twin(images), self.labels(generator), self.class_weights,
                                  self.loss_config)
        total.backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}


def infer(twin: Twin, images: torch.Tensor) -> dict:
    """Eval-mode outputs (BatchNorm running statistics, no dropout), without autograd."""
    twin.eval()
    with torch.inference_mode():
        return twin(images)


def parameter_count(twin: Twin) -> int:
    return int(sum(math.prod(p.shape) for p in twin.parameters()))
