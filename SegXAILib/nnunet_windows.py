"""Sliding windows placed and blended as nnU-Net's predictor places and blends them.

An nnU-Net model's explanations must see the logits its segmentation came from, so every windowed pass of such a
model (the segmentation's own check, Grad-CAM's windows, the black-box methods' scores, the uncertainty samples)
runs in nnU-Net's windows, not MONAI's. The two differ in where the windows fall: MONAI steps by
``size * (1 - overlap)`` and sets the last window flush with the end; nnU-Net takes the fewest windows at most that
far apart and spreads them evenly from start to end (``compute_steps_for_sliding_window``). Both pad a grid smaller
than a window by ``diff // 2`` before and the rest after, and both weight a window's voxels by a Gaussian of
sigma = size / 8, which nnU-Net scales so its peak is 10 (``compute_gaussian``): the weights only matter relative
to each other, but nnU-Net also replaces its zeros by the smallest non-zero weight, which a window's corners feel.

nnU-Net's own helpers place and weigh the windows here (nnunetv2 is installed wherever an nnU-Net model loads);
the stitching is SegXAI's, in float32 on the CPU (nnU-Net accumulates in float16: its logits differ from these by
float16 rounding, about 1e-3), so that a window may return several tensors, some on coarser grids (a layer's
activations), as MONAI's stitcher allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product

import torch
import torch.nn.functional as F

from .models.card import Windows
from .padding import padding_to

Window = list[list[slice]]
"""A window's position as MONAI's ``with_coord`` gives it: one list per batch element of
``[slice(None), slice(None), slice(k0, k1), slice(j0, j1), slice(i0, i1)]`` into the padded grid."""


def window_starts(shape: Sequence[int], windows: Windows) -> list[list[int]]:
    """Each axis's window starts on a grid of ``shape`` (at least the window), as nnU-Net computes them with tile
    step ``1 - overlap``; an axis whose window is one voxel thick (a 2D network's) is visited at every slice."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(tuple(shape), tuple(windows.size), 1.0 - windows.overlap)
    return [list(range(n)) if size == 1 else [int(s) for s in axis]
            for axis, n, size in zip(steps, shape, windows.size)]


def window_total(shape: Sequence[int], windows: Windows) -> int:
    """How many windows :func:`stitch_nnunet_windows` runs over a grid of ``shape`` (for progress)."""
    padded = [max(n, size) for n, size in zip(shape, windows.size)]
    total = 1
    for starts in window_starts(padded, windows):
        total *= len(starts)
    return total


def _importance(windows: Windows) -> torch.Tensor:
    """nnU-Net's Gaussian weights of one window (its peak 10, no zeros), float32 (*size); ones when blending is
    constant (nnU-Net's ``use_gaussian=False``)."""
    if windows.blend != "gaussian":
        return torch.ones(windows.size)
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    return compute_gaussian(tuple(windows.size), sigma_scale=windows.sigma_scale, value_scaling_factor=10,
                            dtype=torch.float32, device=torch.device("cpu")).clone()


def stitch_nnunet_windows(
    predictor: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    image: torch.Tensor,
    windows: Windows,
    pad: Callable[[torch.Tensor, list[int]], torch.Tensor],
    with_coord: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``predictor`` over (N, C, D, H, W) ``image`` in nnU-Net's windows, its outputs blended with nnU-Net's
    Gaussian: each output (N, C_o, *S_o) on the CPU, ``S_o`` the image's grid scaled as the output's grid is
    scaled to the window's (a layer on a grid 4 times coarser gives a map 4 times coarser).

    ``pad(image, amounts)`` pads a grid smaller than a window (``F.pad``'s order of amounts; the card's padding).
    With ``with_coord`` the predictor is called as ``predictor(window, position)`` (:data:`Window`), as MONAI does.
    """
    shape = list(image.shape[2:])
    amounts = padding_to(tuple(shape), windows.size)  # nnU-Net's pad_nd_image centres as MONAI does
    below = amounts[-2::-2]
    padded = pad(image, amounts) if any(amounts) else image
    grid = list(padded.shape[2:])
    importance = _importance(windows)[None, None]
    sums: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    scales: list[list[float]] = []
    for start in product(*window_starts(grid, windows)):
        box = [slice(s, s + size) for s, size in zip(start, windows.size)]
        position: Window = [[slice(None), slice(None), *box]]
        window = padded[(slice(None), slice(None), *box)]
        out = predictor(window, position) if with_coord else predictor(window)
        outputs = out if isinstance(out, tuple) else (out,)
        if not sums:
            for o in outputs:
                scale = [n / size for n, size in zip(o.shape[2:], windows.size)]
                scales.append(scale)
                size_o = [int(n * z) for n, z in zip(grid, scale)]
                sums.append(torch.zeros((image.shape[0], o.shape[1], *size_o)))
                weights.append(torch.zeros((1, 1, *size_o)))
        for o, total, weight, scale in zip(outputs, sums, weights, scales):
            w = importance if o.shape[2:] == importance.shape[2:] else F.interpolate(
                importance, size=o.shape[2:], mode="nearest")
            # a coarse output's start rounds down (as MONAI's); kept inside the grid where the rounding would overrun
            at = (slice(None), slice(None), *(slice(min(int(s * z), m - n), min(int(s * z), m - n) + n)
                                              for s, z, n, m in zip(start, scale, o.shape[2:], total.shape[2:])))
            total[at] += o.detach().float().cpu() * w
            weight[at] += w
    results = []
    for total, weight, scale in zip(sums, weights, scales):
        crop = tuple(slice(int(b * z), int(b * z) + max(int(n * z), 1)) for b, n, z in zip(below, shape, scale))
        results.append((total / weight)[(slice(None), slice(None), *crop)])
    return results[0] if len(results) == 1 else tuple(results)
