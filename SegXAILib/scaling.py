"""Min-max scaling of maps to [0, 1], for numpy arrays and torch tensors alike."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Values = TypeVar("Values", np.ndarray, torch.Tensor)


def minmax(values: Values, keep_positive: bool = False) -> Values:
    """Scale to [0, 1] (never NaN).

    A constant map has no range: it becomes zeros, or with ``keep_positive`` 1 where positive and 0
    elsewhere (e.g. a sufficient region that covers the whole grid keeps everything).
    """
    low, high = values.min(), values.max()
    if high > low:
        return (values - low) / (high - low)
    if isinstance(values, torch.Tensor):
        return (values > 0).to(values.dtype) if keep_positive else torch.zeros_like(values)
    return (values > 0).astype(values.dtype) if keep_positive else np.zeros_like(values)
