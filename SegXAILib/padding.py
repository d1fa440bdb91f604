"""Padding a tensor to a window size, as MONAI's sliding window does."""

from __future__ import annotations


def padding_to(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[int]:
    """``F.pad`` widths centring a (..., *shape) tensor in ``patch`` where smaller, as MONAI's sliding window does."""
    pad: list[int] = []
    for size, roi in zip(reversed(shape), reversed(patch)):
        diff = max(roi - size, 0)
        pad += [diff // 2, diff - diff // 2]
    return pad
