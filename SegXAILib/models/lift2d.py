"""A 2D network lifted to the equivalent 3D network acting on one slice: (N, C, 1, H, W) in, (N, K, 1, H, W) out.

SegXAI runs every network on 5-D windows of a volume, and its layer methods (Grad-CAM, ProtoSeg, the deep-supervision
heads) hook layers expecting 5-D activations. A 2D nnU-Net (configuration ``2d``) is a U-Net of
``dynamic_network_architectures`` taking (N, C, H, W); :func:`lift_2d_network` copies it with each 2D layer replaced by
its 3D twin whose depth extent is 1 (a k x k convolution becomes a 1 x k x k one with the same weights, the depth axis
inserted), so the lifted network computes on (N, C, 1, H, W) what the 2D one computes on (N, C, H, W), and every
activation has depth 1. The module tree keeps its names (``decoder.stages.3...``), so a layer named for the 2D network
names the lifted one's.

Only layers whose effect on one slice is known are lifted or kept; any other layer (a transformer block, a squeeze and
excitation block that averages over axes 2 and 3, a custom module) is refused with one line naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import SegXAIError


def _slice(value: Any, depth: Any) -> tuple[Any, ...]:
    """A 2D layer's per-axis ``value`` (an int or an (h, w) pair) as the 3D one's (depth, h, w)."""
    return (depth, *(value if isinstance(value, (tuple, list)) else (value, value)))


def _conv(layer: nn.Conv2d) -> nn.Conv3d:
    padding = layer.padding if isinstance(layer.padding, str) else _slice(layer.padding, 0)
    return nn.Conv3d(layer.in_channels, layer.out_channels, _slice(layer.kernel_size, 1), _slice(layer.stride, 1),
                     padding, _slice(layer.dilation, 1), layer.groups, layer.bias is not None, layer.padding_mode)


def _transposed_conv(layer: nn.ConvTranspose2d) -> nn.ConvTranspose3d:
    return nn.ConvTranspose3d(layer.in_channels, layer.out_channels, _slice(layer.kernel_size, 1),
                              _slice(layer.stride, 1), _slice(layer.padding, 0), _slice(layer.output_padding, 0),
                              layer.groups, layer.bias is not None, _slice(layer.dilation, 1), layer.padding_mode)


def _norm(kind: type[nn.Module]) -> Callable[[Any], nn.Module]:
    """InstanceNorm2d / BatchNorm2d statistics over (H, W) are the 3D ones' over (1, H, W): same parameters."""
    return lambda layer: kind(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)


def _max_pool(layer: nn.MaxPool2d) -> nn.MaxPool3d:
    return nn.MaxPool3d(_slice(layer.kernel_size, 1), _slice(layer.stride, 1), _slice(layer.padding, 0),
                        _slice(layer.dilation, 1), layer.return_indices, layer.ceil_mode)


def _avg_pool(layer: nn.AvgPool2d) -> nn.AvgPool3d:
    return nn.AvgPool3d(_slice(layer.kernel_size, 1), _slice(layer.stride, 1), _slice(layer.padding, 0),
                        layer.ceil_mode, layer.count_include_pad, layer.divisor_override)


LIFTS: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    nn.Conv2d: _conv,
    nn.ConvTranspose2d: _transposed_conv,
    nn.InstanceNorm2d: _norm(nn.InstanceNorm3d),
    nn.BatchNorm2d: _norm(nn.BatchNorm3d),
    nn.Dropout2d: lambda layer: nn.Dropout3d(layer.p, layer.inplace),  # whole channels dropped, as in 2D
    nn.MaxPool2d: _max_pool,
    nn.AvgPool2d: _avg_pool,
    nn.AdaptiveAvgPool2d: lambda layer: nn.AdaptiveAvgPool3d(_slice(layer.output_size, 1)),
    nn.AdaptiveMaxPool2d: lambda layer: nn.AdaptiveMaxPool3d(_slice(layer.output_size, 1), layer.return_indices),
}
"""2D layer type -> its 3D twin acting on depth 1 (weights copied by :func:`_lift_layer`)."""

KEPT = frozenset(f"torch.nn.modules.{name}" for name in (
    "container.Sequential", "container.ModuleList", "container.ModuleDict", "linear.Identity",
    "activation.LeakyReLU", "activation.ReLU", "activation.ReLU6", "activation.ELU", "activation.GELU",
    "activation.SiLU", "activation.Mish", "activation.PReLU", "activation.Sigmoid", "activation.Tanh",
    "dropout.Dropout", "normalization.GroupNorm")) | frozenset(
    f"dynamic_network_architectures.{name}" for name in (
        "architectures.unet.PlainConvUNet", "architectures.unet.ResidualEncoderUNet", "architectures.unet.ResidualUNet",
        "building_blocks.plain_conv_encoder.PlainConvEncoder", "building_blocks.residual_encoders.ResidualEncoder",
        "building_blocks.unet_decoder.UNetDecoder", "building_blocks.unet_residual_decoder.UNetResDecoder",
        "building_blocks.simple_conv_blocks.StackedConvBlocks",
        "building_blocks.simple_conv_blocks.ConvDropoutNormReLU",
        "building_blocks.residual.StackedResidualBlocks", "building_blocks.residual.BasicBlockD",
        "building_blocks.residual.BottleneckD", "building_blocks.regularization.DropPath"))
"""Modules kept as they are: element-wise or channel-wise layers, and containers whose ``forward`` only chains their
children and concatenates or adds along the channel axis (read in dynamic_network_architectures' source), so they
work on 5-D tensors unchanged. Exact types: a subclass may override ``forward``."""


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _lift_layer(layer: nn.Module) -> nn.Module:
    """The 3D twin of one 2D ``layer`` (a key of :data:`LIFTS`): its parameters and buffers copied, the convolution
    weights (out, in, kh, kw) given a depth axis of size 1 (out, in, 1, kh, kw)."""
    twin = LIFTS[type(layer)](layer)
    state = {key: value.unsqueeze(2) if key == "weight" and value.ndim == 4 else value
             for key, value in layer.state_dict().items()}
    twin.load_state_dict(state)
    reference = next(layer.parameters(), None)
    if reference is not None:
        twin.to(reference.device, reference.dtype)
    return twin.train(layer.training)


def lift_2d_network(network: nn.Module) -> nn.Module:
    """A copy of the 2D ``network`` (maps (N, C, H, W) to (N, K, H, W)) that maps (N, C, 1, H, W) to (N, K, 1, H, W)
    with the same numbers, every 2D layer replaced by its 3D twin (:data:`LIFTS`), module names unchanged.
    ``network`` itself is not changed.

    Raises:
        SegXAIError: a module neither lifted nor known to work on 5-D tensors (:data:`KEPT`), named by its path.
    """
    lifted = copy.deepcopy(network)
    _lift_children(lifted, "network", {})
    return lifted


def _lift_children(module: nn.Module, path: str, done: dict[int, tuple[nn.Module, nn.Module]]) -> None:
    """Replace ``module``'s 2D descendants in place. A module reached under several names (a UNetDecoder holds its
    encoder again as ``decoder.encoder``; a ConvDropoutNormReLU its convolution as ``conv`` and ``all_modules.0``)
    is lifted once and every name gets that one twin, so a layer hooked by its name is the one ``forward`` runs.
    ``done``: id of each module visited -> (the module, kept alive so its id stays its own, its twin)."""
    if id(module) in done:
        return
    done[id(module)] = (module, module)
    if _type_name(module) not in KEPT:
        raise SegXAIError(f"SegXAI cannot explain this 2D network slice by slice: its part {path} is a "
                          f"{_type_name(module)}, which it does not know how to apply to a slice of a volume")
    for name, child in module.named_children():
        if type(child) in LIFTS:
            if id(child) not in done:
                done[id(child)] = (child, _lift_layer(child))
            setattr(module, name, done[id(child)][1])
        else:
            _lift_children(child, f"{path}.{name}", done)
