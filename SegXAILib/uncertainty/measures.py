"""Uncertainty measures on several probability predictions of one scan (METHODS.md section 6).

Every function takes a stack ``probs`` of T softmax predictions, shape (T, n_classes, *S)
(S = (D, H, W), or any spatial shape), from MC dropout, test-time augmentation or an ensemble,
and returns float32 maps of shape S:

- ``predictive_entropy``: H[mean_t p_t] = -sum_c pbar_c log pbar_c, the total uncertainty (nats,
  natural log; 0 .. log(n_classes)).
- ``expected_entropy``: mean_t H[p_t], the uncertainty every sample has on its own (aleatoric part).
- ``mutual_information``: H[mean_t p_t] - mean_t H[p_t] (BALD), the part that comes from the samples
  disagreeing (epistemic part); >= 0 by Jensen's inequality.
- ``variance``: the population variance over the T samples (1/T, as in paper 000's deep-ensemble
  variance) of a class probability.

:class:`UncertaintyAccumulator` gives the same maps from samples added one at a time, so T
samples of a large volume never have to be held in memory together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TINY = np.finfo(np.float32).tiny
"""Floor for probabilities inside the log: p log p -> 0 as p -> 0, and 0 * log(tiny) is exactly 0."""


def _plogp(p: np.ndarray) -> np.ndarray:
    """Elementwise p log p, 0 where p == 0 (no -inf, no NaN)."""
    return p * np.log(np.clip(p, _TINY, None))


def entropy(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """Shannon entropy in nats of the distributions along ``axis``: -sum p log p, float32."""
    return (-_plogp(np.asarray(p, np.float32)).sum(axis=axis)).astype(np.float32)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the mean prediction, (T, n_classes, *S) -> (*S), nats."""
    return entropy(np.asarray(probs, np.float32).mean(axis=0), axis=0)


def expected_entropy(probs: np.ndarray) -> np.ndarray:
    """Mean over samples of each sample's entropy, (T, n_classes, *S) -> (*S), nats."""
    return entropy(probs, axis=1).mean(axis=0)


def mutual_information(probs: np.ndarray) -> np.ndarray:
    """BALD: predictive entropy - expected entropy, (T, n_classes, *S) -> (*S), nats.

    Clipped at 0: the difference is >= 0 in exact arithmetic, rounding may leave -1e-8.
    """
    return np.maximum(predictive_entropy(probs) - expected_entropy(probs), 0.0).astype(np.float32)


def variance(probs: np.ndarray, channels: Sequence[int] | None = None) -> np.ndarray:
    """Population variance over the T samples (divides by T).

    Args:
        probs: (T, n_classes, *S) probabilities.
        channels: ``None``: the variance of every class probability, shape (n_classes, *S).
            A list of channels: the variance of their *summed* probability (the probability of a
            target made of several classes, e.g. whole tumour), shape (*S). Summing first is not the
            same as summing per-class variances: the covariances between the classes count.
    """
    probs = np.asarray(probs, np.float32)
    if channels is None:
        return probs.var(axis=0).astype(np.float32)
    return probs[:, list(channels)].sum(axis=1).var(axis=0).astype(np.float32)


def uncertainty_maps(probs: np.ndarray, channels: Sequence[int]) -> dict[str, np.ndarray]:
    """The three maps the sampling explainers show, from a (T, n_classes, *S) stack.

    Returns:
        ``entropy`` (predictive entropy over all classes), ``variance`` (of the summed
        probability of ``channels``) and ``mutual_information``; each float32 (*S).
    """
    return {"entropy": predictive_entropy(probs), "variance": variance(probs, channels),
            "mutual_information": mutual_information(probs)}


class UncertaintyAccumulator:
    """:func:`uncertainty_maps` from samples added one at a time.

    Keeps n_classes + 3 float32 arrays of shape S: the running mean of each class probability,
    the running sum of per-sample entropies, and Welford's running mean and sum of squared
    deviations of the target probability. Welford instead of sum of p and p^2 because
    E[p^2] - E[p]^2 cancels catastrophically in float32 when the samples nearly agree (the
    usual case), leaving variances of +-1e-7 where the true value is 0.

    Args:
        channels: the target's channels, whose summed probability the variance map is of. They
            are fixed here rather than in :meth:`maps` because the variance of a sum needs the
            sum of every sample, which is not recoverable afterwards from per-class statistics.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        self.channels = list(channels)
        self.count = 0
        self._mean: np.ndarray | None = None  # (n_classes, *S) running mean of p
        self._entropy_sum: np.ndarray | None = None  # (*S) sum_t H[p_t]
        self._target_mean: np.ndarray | None = None  # (*S) running mean of the target probability
        self._target_m2: np.ndarray | None = None  # (*S) sum of squared deviations from it

    def add(self, probs: np.ndarray) -> None:
        """Add one sample, (n_classes, *S) probabilities."""
        probs = np.asarray(probs, np.float32)
        target = probs[self.channels].sum(axis=0)
        self.count += 1
        if self._mean is None:
            self._mean = probs.copy()
            self._entropy_sum = entropy(probs)
            self._target_mean = target
            self._target_m2 = np.zeros_like(target)
            return
        if probs.shape != self._mean.shape:
            raise ValueError(f"sample shape {probs.shape} differs from the first sample's {self._mean.shape}")
        self._mean += (probs - self._mean) / self.count
        self._entropy_sum += entropy(probs)
        delta = target - self._target_mean
        self._target_mean += delta / self.count
        self._target_m2 += delta * (target - self._target_mean)

    def maps(self) -> dict[str, np.ndarray]:
        """The same dictionary as :func:`uncertainty_maps` on the stacked samples."""
        if self.count == 0:
            raise ValueError("no samples were added")
        total = entropy(self._mean)
        mutual = np.maximum(total - self._entropy_sum / self.count, 0.0).astype(np.float32)
        return {"entropy": total, "variance": (self._target_m2 / self.count).astype(np.float32),
                "mutual_information": mutual}
