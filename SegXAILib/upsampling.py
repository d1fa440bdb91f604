"""The one interpolation convention for feature maps, CAMs and deep predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def upsample_to(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *grid) -> (N, C, *size) by (bi/tri)linear interpolation with ``align_corners=False``.

    Voxel centres of the coarse grid sit at the centres of the fine voxels they cover (as for a
    strided convolution), not on the corners; ``scipy.ndimage.zoom`` uses the other convention and
    gives a shifted grid. Returned unchanged when already of that size.
    """
    if tuple(tensor.shape[2:]) == tuple(size):
        return tensor
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(tensor, size=tuple(size), mode=mode, align_corners=False)
