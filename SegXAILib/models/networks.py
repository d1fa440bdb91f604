"""Network architectures a model card can name, built from the card's arguments.

Each builder takes ``(in_channels, out_channels, **args)`` and returns a 3D ``nn.Module``
mapping (N, in_channels, D, H, W) to logits (N, out_channels, D, H, W). Later families
(EU-Nets with MHEX+ heads, the dual encoder) register here too, so every path (inference,
explanations, training, Slicer) sees one table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.networks.nets import AttentionUnet, UNet
from torch import nn

from ..errors import SegXAIError
from .card import ModelCard, stride_multiple
from .dual_encoder import build_dual_encoder
from .eunet import build_eunet
from .linknet import build_linknet3d

NetworkBuilder = Callable[..., nn.Module]


def build_unet(in_channels: int, out_channels: int, channels=(16, 32, 64, 128), strides=(2, 2, 2),
               num_res_units: int = 0, dropout: float = 0.0, norm: str = "INSTANCE", **kwargs: Any) -> nn.Module:
    """MONAI's UNet; ``num_res_units=0`` is the plain U-Net of paper 001."""
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units, dropout=dropout, norm=norm, **kwargs)


def build_residual_unet(in_channels: int, out_channels: int, num_res_units: int = 2, **kwargs: Any) -> nn.Module:
    """The residual U-Net (ResUNet of paper 001): MONAI's UNet with residual units in every block."""
    return build_unet(in_channels, out_channels, num_res_units=num_res_units, **kwargs)


def build_attention_unet(in_channels: int, out_channels: int, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                         dropout: float = 0.0, **kwargs: Any) -> nn.Module:
    """MONAI's AttentionUnet (additive attention gates on every skip connection)."""
    return AttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         channels=tuple(channels), strides=tuple(strides), dropout=dropout, **kwargs)


ARCHITECTURES: dict[str, NetworkBuilder] = {
    "unet": build_unet,
    "residual_unet": build_residual_unet,
    "attention_unet": build_attention_unet,
    "eunet": build_eunet,
    "dual_encoder": build_dual_encoder,
    "linknet3d": build_linknet3d,
}


def build_network(architecture: dict[str, Any], in_channels: int, out_channels: int) -> nn.Module:
    """Build the network a card's ``architecture`` entry ({"name": ..., "args": {...}}) describes."""
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise SegXAIError(f"unknown architecture {name!r}; SegXAI builds: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[name](in_channels, out_channels, **architecture.get("args", {}))
    except TypeError as exc:
        raise SegXAIError(f"invalid arguments for architecture {name!r}: {exc}") from None


def input_multiple(card: ModelCard) -> tuple[int, ...]:
    """Per-axis multiple the network's input size must be.

    The product of the card's ``strides`` when its architecture lists them (MONAI U-Nets), else the
    largest power of two dividing the patch size (a size the network is known to accept).
    """
    multiple = stride_multiple(card.architecture, len(card.patch_size))
    if multiple is not None:
        return multiple
    return tuple(p & -p for p in card.patch_size)
