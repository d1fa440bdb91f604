"""The target score: the one number that gradient and perturbation explainers differentiate or measure.

Every such method (Grad-CAM, Grad-CAM++, occlusion, saliency, SmoothGrad, integrated gradients) scores the
target T (its output channels, e.g. the three tumour classes of "whole tumour") over a region R of the model
grid (by default the model's predicted mask of T) as

    S = sum_{p in R} t(p),    t(p) = log P_T(p) - log (1 - P_T(p)),    P_T = sum_{c in T} softmax(z)_c,

the log-odds of the target at each voxel, computed from what the network returns (the model card's ``output``):

    logits z:          t = logsumexp_{c in T} z_c - logsumexp_{c not in T} z_c
    probabilities p:   t = log max(sum_{c in T} p_c, eps) - log max(sum_{c not in T} p_c, eps),  eps = 1e-30

Why the log-odds and not the raw target logit z_c:

- a network that returns probabilities has no logits to give; log-probabilities are all there is, and the
  logits are known only up to a constant per voxel (softmax(z) = softmax(z + a)). A score must not depend
  on that constant, or the explanation of one function would change with how it is packaged (a softmax
  inside the network or not). The log-odds does not: it is the same number from z and from softmax(z), so
  Grad-CAM and the other methods give the same maps for a network and for that network followed by a
  softmax (tested);
- with two classes it is the logit difference z_1 - z_0 = log p_1 - log p_0; with more, it weighs the
  evidence for the target against every other class (what decides whether a voxel is in the target's
  mask), not the target's logit alone;
- unlike log P_T it does not saturate: d t / d z is bounded by 1 in size where the model is sure, while the
  gradient of a probability vanishes there (about 1e-7 for deepbet's saturated softmax).

``eps`` only keeps the logarithm finite where a float32 probability has underflowed to 0 (a logit gap
beyond about 87); the gradient there is 0. A target made of every channel has no "rest": its score is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["EPSILON", "SCORE_WORDS", "log_odds", "target_scores"]

EPSILON = 1e-30
"""Probabilities are clamped to at least this before their logarithm (float32 underflow)."""

SCORE_WORDS = "log-odds"
"""How descriptions name the target score (see the module docstring)."""


def log_odds(output: torch.Tensor, channels: Sequence[int], kind: str = "logits") -> torch.Tensor:
    """t, the target's log-odds at each voxel: (N, n_classes, *S) network output -> (N, *S) float32.

    Args:
        output: what the network returned: logits, or probabilities when ``kind`` is ``probabilities``.
        channels: the target's output channels.
        kind: the model card's ``output``.
    """
    output = output.float()
    inside = torch.zeros(output.shape[1], dtype=torch.bool)
    inside[list(channels)] = True
    if bool(inside.all()):
        return torch.zeros_like(output[:, 0])
    target, rest = inside.nonzero()[:, 0].tolist(), (~inside).nonzero()[:, 0].tolist()
    if kind == "probabilities":
        return (torch.log(output[:, target].sum(1).clamp_min(EPSILON))
                - torch.log(output[:, rest].sum(1).clamp_min(EPSILON)))
    if kind != "logits":
        raise ValueError(f"unknown network output {kind!r}")
    return torch.logsumexp(output[:, target], dim=1) - torch.logsumexp(output[:, rest], dim=1)


def target_scores(output: torch.Tensor, channels: Sequence[int], weight: torch.Tensor,
                  kind: str = "logits") -> torch.Tensor:
    """S of each example of a batch: sum over the voxels of ``weight * t``, shape (N,).

    Args:
        output: (N, n_classes, *S) network output.
        weight: the region R as an indicator (or weights), broadcastable to (N, *S), e.g. (1, *S) or (*S).
        kind: the model card's ``output``.
    """
    t = log_odds(output, channels, kind)
    return (t * weight.to(t.device, t.dtype)).flatten(1).sum(1)
