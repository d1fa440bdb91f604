"""Forward-mode derivatives of decoder blocks, written out, for many directions at one point.

The collaboration-gradient map (:mod:`.collaboration`) needs the derivative of the sub-network
between two MHEX+ heads along k directions, always at the same input. ``torch.func.jvp`` recomputes
every layer's value with each direction and carries the directions through generic kernels: on a
CPU a direction costs about six forward passes of that sub-network. :func:`linearize` runs the
forward pass once, keeps what each layer's derivative needs (weights, instance-norm statistics,
activation slopes) and returns the linear map; a direction then costs one pass of convolutions
without bias and elementwise products, about one forward pass.

Written out: convolutions and transposed convolutions (1-3D), instance norm, batch norm in eval mode,
dropout in eval mode, ReLU, PReLU, identity, ``nn.Sequential`` (MONAI's ``Convolution`` and ``ADN``
are sequences) and MONAI's ``ResidualUnit``. Any other module falls back to ``torch.func.jvp`` for
that module only (:func:`jvp_map`), so every network is handled, only more slowly.

Tangents carry the directions in a leading dimension: (m, N, C, *grid) for a value (N, C, *grid).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import nn
from torch.func import jvp, vmap

LinearMap = Callable[[torch.Tensor], torch.Tensor]
"""Tangents (m, N, *in) -> tangents (m, N, *out) at the point a :func:`linearize` call fixed."""

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def linearize(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
    """``module(x)`` and the derivative of ``module`` at ``x`` as a function of tangents.

    Args:
        module: in eval mode (dropout and batch norm are then fixed maps).
        x: the point, (N, C, *grid).

    Returns:
        ``module(x)`` and the linear map dx (m, N, C, *grid) -> d module(x) (m, N, C', *grid').
    """
    if type(module).forward is nn.Sequential.forward:
        return _sequence(module, x)
    if isinstance(module, ResidualUnit):
        return _residual_unit(module, x)
    if isinstance(module, _CONVOLUTIONS) and module.padding_mode == "zeros":
        return module(x), _per_batch(lambda t: module._conv_forward(t, module.weight, None))
    if type(module) in _TRANSPOSED and module.padding_mode == "zeros":
        transposed = _TRANSPOSED[type(module)]
        return module(x), _per_batch(lambda t: transposed(t, module.weight, None, module.stride, module.padding,
                                                          module.output_padding, module.groups, module.dilation))
    if isinstance(module, _INSTANCE_NORMS) and not (module.track_running_stats and module.running_mean is not None):
        return _instance_norm(module, x)
    if isinstance(module, _BATCH_NORMS) and not module.training and module.running_var is not None:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return module(x), lambda dx: dx * _channelwise(scale, x)
    if isinstance(module, (*_DROPOUTS, nn.Identity)) and not module.training:
        return module(x), lambda dx: dx
    if isinstance(module, nn.ReLU):
        active = x > 0
        return module(x), lambda dx: dx * active
    if isinstance(module, nn.PReLU):
        slope = torch.where(x > 0, torch.ones((), dtype=x.dtype, device=x.device), _channelwise(module.weight, x))
        return module(x), lambda dx: dx * slope
    return module(x), jvp_map(module, x)


def linearize_from_channel(module: nn.Module, x: torch.Tensor, start: int) -> tuple[torch.Tensor, LinearMap]:
    """:func:`linearize` for tangents that are zero in the channels of ``x`` before ``start`` (a
    decoder block reading ``cat(skip, stream)`` moves only with the stream): the map takes tangents
    of channels ``start:`` only, and a leading convolution reads just their weights."""
    if type(module).forward is nn.Sequential.forward and len(module) > 0:
        children = list(module)
        x, first = linearize_from_channel(children[0], x, start)
        x, rest = _sequence(children[1:], x)
        return x, _chain([first, rest])
    plain = getattr(module, "groups", None) == 1 and getattr(module, "padding_mode", None) == "zeros"
    if plain and isinstance(module, _CONVOLUTIONS):
        weight = module.weight[:, start:]  # (out, in, *kernel)
        return module(x), _per_batch(lambda t: module._conv_forward(t, weight, None))
    if plain and type(module) in _TRANSPOSED:
        transposed, weight = _TRANSPOSED[type(module)], module.weight[start:]  # (in, out, *kernel)
        return module(x), _per_batch(lambda t: transposed(t, weight, None, module.stride, module.padding,
                                                          module.output_padding, 1, module.dilation))
    value, derivative = linearize(module, x)
    return value, lambda dx: derivative(torch.cat([dx.new_zeros(*dx.shape[:2], start, *dx.shape[3:]), dx], dim=2))


def _sequence(modules: Iterable[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
    maps = []
    for module in modules:
        x, derivative = linearize(module, x)
        maps.append(derivative)
    return x, _chain(maps)


def _chain(maps: list[LinearMap]) -> LinearMap:
    def chain(dx: torch.Tensor) -> torch.Tensor:
        for derivative in maps:
            dx = derivative(dx)
        return dx

    return chain


def _residual_unit(unit: ResidualUnit, x: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
    """MONAI's ``ResidualUnit``: ``conv(x) + residual(x)``."""
    body, d_body = linearize(unit.conv, x)
    skip, d_skip = linearize(unit.residual, x)
    return body + skip, lambda dx: d_body(dx) + d_skip(dx)


def _instance_norm(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
    """y = (x - mean) / s with s = sqrt(var + eps) over each instance's channel: dy = (dx - mean(dx)
    - y mean(y dx)) / s, times the affine weight."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_s = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + norm.eps)
    y = (x - mean) * inv_s
    weight = _channelwise(norm.weight, x) if norm.affine else None

    def derivative(dx: torch.Tensor) -> torch.Tensor:
        dims_t = tuple(d + 1 for d in dims)
        dy = (dx - dx.mean(dims_t, keepdim=True) - y * (y * dx).mean(dims_t, keepdim=True)) * inv_s
        return dy if weight is None else dy * weight

    return norm(x), derivative


def _channelwise(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel values (C,) or (1,) shaped to broadcast against (N, C, *grid)."""
    return values.reshape(1, -1, *([1] * (x.dim() - 2)))


def _per_batch(linear: Callable[[torch.Tensor], torch.Tensor]) -> LinearMap:
    """A linear layer applied to (m, N, ...) tangents through its batch dimension."""
    return lambda dx: linear(dx.flatten(0, 1)).unflatten(0, dx.shape[:2])


def jvp_map(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> LinearMap:
    """The derivative of any function at ``x`` by ``torch.func.jvp``, one direction at a time (vmapped)."""
    return vmap(lambda tangent: jvp(function, (x,), (tangent,))[1])
