"""RE-Net: a DnCNN-17 FEN gives one fingerprint per image; the ParsingNetwork reads it for every head."""

from __future__ import annotations

from adaparse_jax.models.parsing import FENParser


class RENet(FENParser):
    """RE-Net: DnCNN FEN (`dncnn.dncnn_fen`) -> one fingerprint -> ParsingNetwork.

    images [B, S, S, 3] -> {'fingerprints' [B, 1, S, S, 3], 'continuous', 'logits', 'probs'}; every
    head (and every coarse group, as the mean of identical features) reads the one fingerprint.
    """
