"""Overlap measures between segmentations."""

from __future__ import annotations

import numpy as np

from .models.card import ModelCard


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_per_target(predicted: np.ndarray, truth: np.ndarray, card: ModelCard) -> dict[str, float]:
    """Dice of every foreground class and every group (e.g. whole tumour) of ``card``.

    Both arrays hold label values (not channel indices) on the same grid.
    """
    scores = {c.name: dice(predicted == c.label, truth == c.label) for c in card.classes if c.label != 0}
    for group, labels in card.groups.items():
        scores[group] = dice(np.isin(predicted, labels), np.isin(truth, labels))
    return scores
