"""The one interpolation convention for feature maps, CAMs and deep predictions."""

from __future__ import annotations

import functools
import math
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


@functools.lru_cache(maxsize=32)
def interpolation_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float64 weights of :func:`upsample_to` along one axis: row j holds the weights of
    the coarse voxels that fine voxel j mixes (two nonzero, summing to one)."""
    impulses = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # (n, 1, n): one unit impulse per batch entry
    return F.interpolate(impulses, size=size_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def upsample_separable(maps: torch.Tensor, shape: Sequence[int], adjoint: bool = False) -> torch.Tensor:
    """:func:`upsample_to` of (K, *grid) maps to (K, *shape) as one matrix product per axis.

    (Bi/tri)linear interpolation is separable: it is the 1D interpolation matrix applied along each axis
    in turn. As matrix products (BLAS) this is about twice as fast on a CPU as ``F.interpolate`` for
    many channels at once, and equal to it up to float rounding (about 1e-7 of the values).

    ``adjoint``: the transpose instead, from (K, *shape) fine maps to (K, *grid): ``sum(upsample(x) * y) ==
    sum(x * adjoint(y))`` for every x on ``grid``. ``shape`` is then the coarse grid.
    """
    sizes = list(maps.shape[1:])
    out = maps
    for axis in reversed(range(len(sizes))):
        if sizes[axis] == shape[axis]:
            continue
        weights = (interpolation_matrix(shape[axis], sizes[axis]).T if adjoint
                   else interpolation_matrix(sizes[axis], shape[axis])).to(maps.device, maps.dtype)
        before, after = maps.shape[0] * math.prod(sizes[:axis]), math.prod(sizes[axis + 1:])
        if after == 1:  # the last axis: one large matrix product
            out = out.reshape(before, sizes[axis]) @ weights.T
        else:
            out = torch.matmul(weights, out.reshape(before, sizes[axis], after))
        sizes[axis] = shape[axis]
    return out.reshape(maps.shape[0], *sizes)
